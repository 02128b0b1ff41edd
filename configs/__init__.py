"""The run configs (``*.yaml``) and DeepSpeed JSONs (``deepspeed/``), installed as ``mpdistil_fast.configs`` so that a
wheel install finds the DeepSpeed defaults and ships the example configs (``python -c "import mpdistil_fast.configs
as c; print(c.__path__[0])"`` prints their folder)."""
