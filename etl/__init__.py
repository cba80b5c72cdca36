"""dfn-curate: Spark + Delta data curation with Data Filtering Networks.

``etl`` holds Spark-side steps (``DataFrame -> DataFrame``) and jobs; ``udfs`` holds everything
that touches torch/open_clip (imported lazily on workers).
"""

__version__ = "0.1.0"
