"""A user's own subclass of the RAPID scheduler, given to vLLM by class path (``--scheduler-cls``)."""

from vllm_rapid.core.scheduler import RapidScheduler


class MyRapidScheduler(RapidScheduler):
    pass
