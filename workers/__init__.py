"""Model adapters, one file per model family. No Ray in here: stages own the distribution. One exception: the
vLLM backend (vlm_vllm.py) starts its engine in a Ray actor, the one way to run it on an interpreter of its own
(runtime_env py_executable) beside the project's."""
