"""The Databricks asset bundle (databricks.yml), read as YAML: no workspace, no Databricks CLI,
no Spark session.

Each check returns the problems it finds; the tests assert there are none, and
:func:`test_the_checks_catch_a_broken_bundle` breaks a copy of the bundle in each way a check
looks for and asserts that check reports it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from etl.cli import COMMANDS
from etl.config import ConfigError, load_config
from etl.steps import PIPELINE, STEPS

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "databricks.yml"
CLASSIC = "dfn_curate_pipeline"
SERVERLESS = "dfn_curate_serverless"
SERVERLESS_NOTEBOOK = "dfn_curate_notebook_serverless"
# what serverless brings itself; installed over it, it breaks the session
NOT_ON_SERVERLESS = ("pyspark", "delta-spark", "databricks-connect")
CLUSTER_KEYS = ("job_cluster_key", "new_cluster", "existing_cluster_id")
VAR = re.compile(r"\$\{var\.([\w-]+)\}")
WORKSPACE_FILES = "${workspace.file_path}"  # where the bundle syncs this repository


# ---- reading the bundle -----------------------------------------------------------------------


def load_bundle() -> dict:
    return yaml.safe_load(BUNDLE.read_text())


def jobs(bundle: dict) -> dict[str, dict]:
    return bundle["resources"]["jobs"]


def resolve(bundle: dict, text: str) -> str:
    """``text`` with ``${var.*}`` replaced by the variables' defaults and the synced files'
    folder by this checkout (unknown variables are left as they are)."""
    defaults = {k: str(v.get("default", "")) for k, v in bundle.get("variables", {}).items()}
    for _ in range(10):
        new = VAR.sub(lambda m: defaults.get(m.group(1), m.group(0)), text)
        if new == text:
            break
        text = new
    return text.replace(WORKSPACE_FILES, str(ROOT))


def strings(node: Any) -> Iterator[str]:
    """Every string in a YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def repo_path(bundle: dict, text: str) -> Path:
    """A path the bundle names (relative to databricks.yml, or under the synced files)."""
    p = Path(resolve(bundle, text))
    return p if p.is_absolute() else ROOT / p


def wheel_steps(job: dict) -> list[str]:
    """The ``dfn-curate`` command of each wheel task, in task order."""
    return [t["python_wheel_task"]["parameters"][0] for t in job["tasks"]
            if "python_wheel_task" in t]


def file_steps(job: dict) -> list[str]:
    """The step of each ``spark_python_task`` (by its job file's module), in task order."""
    by_module = {s.module: s.name for s in STEPS}
    return [by_module.get(Path(t["spark_python_task"]["python_file"]).stem, "?")
            for t in job["tasks"] if "spark_python_task" in t]


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- the checks -------------------------------------------------------------------------------


def python_file_problems(bundle: dict) -> list[str]:
    """Every spark_python_task runs a job file that exists and belongs to a registered step."""
    modules = {s.module for s in STEPS}
    out = []
    for name, job in jobs(bundle).items():
        for task in job.get("tasks", []):
            spt = task.get("spark_python_task")
            if spt is None:
                continue
            f = repo_path(bundle, spt["python_file"])
            if not f.is_file():
                out.append(f"{name}.{task['task_key']}: {spt['python_file']} does not exist")
            elif f.parent != ROOT / "etl" / "jobs" or f.stem not in modules:
                out.append(f"{name}.{task['task_key']}: {spt['python_file']} is no step's job file")
    return out


def order_problems(steps: list[str], where: str) -> list[str]:
    """``steps`` are registered, and the pipeline steps among them run in PIPELINE order."""
    registered = {s.name for s in STEPS}
    out = [f"{where}: {s!r} is not a registered step" for s in steps if s not in registered]
    ran = [s for s in steps if s in PIPELINE]
    if ran != sorted(ran, key=PIPELINE.index):
        out.append(f"{where}: steps {ran} are not in pipeline order {list(PIPELINE)}")
    return out


def classic_problems(bundle: dict) -> list[str]:
    """The classic pipeline job: registered steps in pipeline order, each on a job cluster."""
    job = jobs(bundle)[CLASSIC]
    clusters = {c["job_cluster_key"] for c in job.get("job_clusters", [])}
    out = order_problems(file_steps(job), CLASSIC)
    for task in job["tasks"]:
        if task.get("job_cluster_key") not in clusters:
            out.append(f"{CLASSIC}.{task['task_key']}: job cluster "
                       f"{task.get('job_cluster_key')!r} is not defined")
    return out


def wheel_task_problems(bundle: dict, proj: dict) -> list[str]:
    """Every python_wheel_task runs this project's console script with a known command."""
    scripts = proj.get("scripts", {})
    out = []
    for name, job in jobs(bundle).items():
        for task in job.get("tasks", []):
            pwt = task.get("python_wheel_task")
            if pwt is None:
                continue
            where = f"{name}.{task['task_key']}"
            if normalized(pwt.get("package_name", "")) != normalized(proj["name"]):
                out.append(f"{where}: package_name {pwt.get('package_name')!r} is not "
                           f"{proj['name']!r}")
            if scripts.get(pwt.get("entry_point")) != "etl.cli:main":
                out.append(f"{where}: entry_point {pwt.get('entry_point')!r} is not the "
                           f"dfn-curate console script ({scripts})")
            params = pwt.get("parameters") or [""]
            if params[0] not in COMMANDS:
                out.append(f"{where}: {params[0]!r} is not a dfn-curate step")
    return out


def serverless_problems(bundle: dict, name: str = SERVERLESS) -> list[str]:
    """A serverless job: no cluster anywhere; each task on a defined environment whose
    dependencies hold the project wheel and none of what serverless brings itself."""
    job = jobs(bundle)[name]
    out = []
    if job.get("job_clusters"):
        out.append(f"{name}: has job_clusters (serverless jobs have none)")
    envs = {e["environment_key"]: e.get("spec", {}) for e in job.get("environments", [])}
    for task in job["tasks"]:
        where = f"{name}.{task['task_key']}"
        out += [f"{where}: has {k} (runs on a cluster)" for k in CLUSTER_KEYS if k in task]
        if task.get("libraries"):
            out.append(f"{where}: has task libraries (serverless takes an environment)")
        if "notebook_task" in task:
            continue  # a notebook's environment is its own (see the notebook job)
        key = task.get("environment_key")
        if key not in envs:
            out.append(f"{where}: environment_key {key!r} is not in environments {list(envs)}")
    for key, spec in envs.items():
        deps = [str(d) for d in spec.get("dependencies", [])]
        if not ("environment_version" in spec or "client" in spec):
            out.append(f"{name}: environment {key!r} has no environment_version")
        if not any(d.startswith("./dist/") and d.endswith(".whl") for d in deps):
            out.append(f"{name}: environment {key!r} lacks the project wheel ./dist/*.whl: {deps}")
        for dep in deps:
            req = normalized(re.split(r"[\s<>=!~\[;@]", dep, maxsplit=1)[0])
            if req in NOT_ON_SERVERLESS:
                out.append(f"{name}: environment {key!r} installs {dep!r}; serverless brings "
                           "its own Spark")
    return out


def notebook_problems(bundle: dict) -> list[str]:
    """Every notebook task's notebook exists."""
    out = []
    for name, job in jobs(bundle).items():
        for task in job.get("tasks", []):
            nt = task.get("notebook_task")
            if nt is not None and not repo_path(bundle, nt["notebook_path"]).is_file():
                out.append(f"{name}.{task['task_key']}: {nt['notebook_path']} does not exist")
    return out


def conf_files(bundle: dict) -> set[str]:
    """Every YAML file the jobs and variables name (task parameters, job parameters, widgets)."""
    found = set()
    for text in strings([bundle.get("variables", {}), bundle["resources"]]):
        value = resolve(bundle, text)
        if value.endswith((".yaml", ".yml")):
            found.add(value)
    return found


def conf_problems(bundle: dict) -> list[str]:
    """Every config file named exists and loads with the project's loader (unknown keys and
    bad values fail there)."""
    out = []
    for value in sorted(conf_files(bundle)):
        path = repo_path(bundle, value)
        if not path.is_file():
            out.append(f"{value}: does not exist")
            continue
        try:
            load_config(path)
        except ConfigError as exc:
            out.append(f"{value}: {exc}")
    return out


def variable_problems(bundle: dict) -> list[str]:
    """Every ``${var.*}`` used is a declared variable."""
    declared = set(bundle.get("variables", {}))
    used = {m for text in strings(bundle) for m in VAR.findall(text)}
    return [f"${{var.{v}}} is used but not declared" for v in sorted(used - declared)]


def notebook_wheel_problems(bundle: dict, proj: dict) -> list[str]:
    """The serverless notebook installs the wheel this version builds, and the bundle syncs it
    (dist/ is git-ignored, so only ``sync.include`` uploads it)."""
    out = []
    task = jobs(bundle)[SERVERLESS_NOTEBOOK]["tasks"][0]
    wheel = resolve(bundle, task["notebook_task"].get("base_parameters", {}).get("wheel", ""))
    want = f"{normalized(proj['name']).replace('-', '_')}-{proj['version']}-py3-none-any.whl"
    if wheel != str(ROOT / "dist" / want):
        out.append(f"{SERVERLESS_NOTEBOOK}: wheel parameter {wheel!r} is not dist/{want}")
    if "dist/*.whl" not in bundle.get("sync", {}).get("include", []):
        out.append("sync.include lacks dist/*.whl: the notebook's wheel is never uploaded")
    return out


# ---- the tests --------------------------------------------------------------------------------


def test_every_job_file_exists_and_is_a_registered_step():
    assert not python_file_problems(load_bundle())


def test_classic_job_runs_registered_steps_in_pipeline_order():
    assert not classic_problems(load_bundle())


def test_wheel_tasks_run_the_projects_console_script():
    assert not wheel_task_problems(load_bundle(), project())


def test_serverless_job_runs_the_wheel_on_serverless():
    bundle = load_bundle()
    assert not serverless_problems(bundle)
    assert not order_problems(wheel_steps(jobs(bundle)[SERVERLESS]), SERVERLESS)


def test_serverless_job_runs_the_classic_jobs_steps():
    bundle = load_bundle()
    assert wheel_steps(jobs(bundle)[SERVERLESS]) == file_steps(jobs(bundle)[CLASSIC])


def test_serverless_notebook_job_has_no_cluster_and_installs_the_built_wheel():
    bundle = load_bundle()
    assert not serverless_problems(bundle, SERVERLESS_NOTEBOOK)
    assert not notebook_wheel_problems(bundle, project())


def test_every_notebook_exists():
    assert not notebook_problems(load_bundle())


def test_every_referenced_conf_exists_and_loads():
    bundle = load_bundle()
    named = {repo_path(bundle, v) for v in conf_files(bundle)}
    assert {ROOT / "conf" / "databricks.yaml", ROOT / "conf" / "databricks-serverless.yaml"} <= named
    assert not conf_problems(bundle)


def test_every_variable_is_declared():
    assert not variable_problems(load_bundle())


@pytest.mark.parametrize("name", ["databricks.yaml", "databricks-serverless.yaml"])
def test_databricks_confs_keep_tables_in_unity_catalog_and_files_on_a_volume(name):
    cfg = load_config(ROOT / "conf" / name)
    lh = cfg.lakehouse
    assert lh.catalog and lh.schema
    assert lh.root.startswith(f"/Volumes/{lh.catalog}/{lh.schema}/")
    assert all(m.name.startswith(lh.root) and m.pretrained.startswith(lh.root)
               for m in cfg.score.models)


def test_serverless_conf_sets_nothing_a_connect_client_cannot():
    cfg = load_config(ROOT / "conf" / "databricks-serverless.yaml")
    assert cfg.spark.conf == {} and cfg.spark.jars == []
    assert getattr(cfg.spark, "remote", None) is None  # the serverless session is running
    assert cfg.score.device == "cpu"  # serverless jobs have no GPU


def _set(path: list, value: Any) -> Callable[[dict], None]:
    def apply(bundle: dict) -> None:
        node = bundle
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return apply


def _env_deps(bundle: dict) -> list:
    return jobs(bundle)[SERVERLESS]["environments"][0]["spec"]["dependencies"]


def _serverless_task(bundle: dict, i: int = 0) -> dict:
    return jobs(bundle)[SERVERLESS]["tasks"][i]


def _write_bad_conf(bundle: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("score: {no_such_key: 1}\n")
    bundle["variables"]["serverless_conf"]["default"] = str(bad)


BREAKAGES = {
    "missing job file": (
        lambda b, _: _set(["resources", "jobs", CLASSIC, "tasks", 0, "spark_python_task",
                           "python_file"], "etl/jobs/nope.py")(b),
        python_file_problems, "does not exist"),
    "job file of no step": (
        lambda b, _: _set(["resources", "jobs", CLASSIC, "tasks", 0, "spark_python_task",
                           "python_file"], "etl/jobs/common.py")(b),
        python_file_problems, "no step's job file"),
    "classic steps out of order": (
        lambda b, _: jobs(b)[CLASSIC]["tasks"].reverse(), classic_problems, "pipeline order"),
    "undefined job cluster": (
        lambda b, _: _set(["resources", "jobs", CLASSIC, "tasks", 0, "job_cluster_key"],
                          "nope")(b),
        classic_problems, "not defined"),
    "unknown wheel command": (
        lambda b, _: _serverless_task(b)["python_wheel_task"]["parameters"].__setitem__(0, "nope"),
        lambda b: wheel_task_problems(b, project()), "not a dfn-curate step"),
    "wrong wheel package": (
        lambda b, _: _serverless_task(b)["python_wheel_task"].__setitem__("package_name", "etl"),
        lambda b: wheel_task_problems(b, project()), "package_name"),
    "serverless job with a cluster": (
        lambda b, _: jobs(b)[SERVERLESS].__setitem__("job_clusters", jobs(b)[CLASSIC]["job_clusters"]),
        serverless_problems, "job_clusters"),
    "serverless task on a cluster": (
        lambda b, _: _serverless_task(b, 1).__setitem__("job_cluster_key", "gpu"),
        serverless_problems, "runs on a cluster"),
    "undefined environment": (
        lambda b, _: _serverless_task(b, 2).__setitem__("environment_key", "nope"),
        serverless_problems, "is not in environments"),
    "pyspark in the environment": (
        lambda b, _: _env_deps(b).append("pyspark[connect]==4.0.1"),
        serverless_problems, "installs 'pyspark[connect]==4.0.1'"),
    "delta-spark in the environment": (
        lambda b, _: _env_deps(b).append("delta_spark>=4.0"),
        serverless_problems, "installs 'delta_spark>=4.0'"),
    "no wheel in the environment": (
        lambda b, _: _env_deps(b).clear(), serverless_problems, "lacks the project wheel"),
    "notebook job with libraries": (
        lambda b, _: jobs(b)[SERVERLESS_NOTEBOOK]["tasks"][0].__setitem__(
            "libraries", [{"whl": "./dist/*.whl"}]),
        lambda b: serverless_problems(b, SERVERLESS_NOTEBOOK), "task libraries"),
    "stale notebook wheel": (
        lambda b, _: _set(["variables", "notebook_wheel", "default"],
                          "${workspace.file_path}/dist/dfn_curate-0.0.9-py3-none-any.whl")(b),
        lambda b: notebook_wheel_problems(b, project()), "is not dist/"),
    "missing notebook": (
        lambda b, _: jobs(b)[SERVERLESS_NOTEBOOK]["tasks"][0]["notebook_task"].__setitem__(
            "notebook_path", "notebooks/nope.py"),
        notebook_problems, "does not exist"),
    "missing conf": (
        lambda b, _: _set(["variables", "conf", "default"],
                          "${workspace.file_path}/conf/nope.yaml")(b),
        conf_problems, "does not exist"),
    "conf that does not load": (_write_bad_conf, conf_problems, "no_such_key"),
    "undeclared variable": (
        lambda b, _: b["variables"].pop("volume"), variable_problems, "${var.volume}"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_the_checks_catch_a_broken_bundle(breakage, tmp_path):
    bundle = load_bundle()
    assert not BREAKAGES[breakage][1](bundle), "the shipped bundle must pass before breaking it"
    broken = copy.deepcopy(bundle)
    apply, check, needle = BREAKAGES[breakage]
    apply(broken, tmp_path)
    problems = check(broken)
    assert any(needle in p for p in problems), problems
