"""SQL text built from values: column lists of a ``CREATE TABLE`` and string literals."""

from __future__ import annotations

from pyspark.sql import types as T


def ddl(schema: T.StructType) -> str:
    """``schema`` as the column list of a ``CREATE TABLE`` (every column nullable, as a
    DataFrame write makes them: a NOT NULL from one input would fail a later input's null)."""
    return ", ".join(f"{_quote(f.name)} {_ddl_type(f.dataType)}" for f in schema)


def _ddl_type(dt: T.DataType) -> str:
    if isinstance(dt, T.StructType):
        return "struct<" + ", ".join(f"{_quote(f.name)}: {_ddl_type(f.dataType)}"
                                     for f in dt) + ">"
    if isinstance(dt, T.ArrayType):
        return f"array<{_ddl_type(dt.elementType)}>"
    if isinstance(dt, T.MapType):
        return f"map<{_ddl_type(dt.keyType)}, {_ddl_type(dt.valueType)}>"
    return dt.simpleString()


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def sql_string(value: str) -> str:
    """``value`` as a Spark SQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
