"""PLACEHOLDER (being written): the "triton" backend."""

from ..registry import Backend, register_backend


class _Pending(Backend):
    name = "triton"

    def unavailable_reason(self, device):
        return "not implemented yet"


register_backend(_Pending())
