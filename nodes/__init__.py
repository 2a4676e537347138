"""ComfyUI adapters: thin V3 nodes that translate host types into ``d2f_core`` calls."""

from comfy_api.latest import ComfyExtension

from .advanced_node import ADVANCED_NODES
from .ema_node import OPTION_NODES
from .flow_nodes import FLOW_NODES
from .reflow_nodes import REFLOW_NODES
from .scheduled_sampling_node import SCHEDULED_SAMPLING_NODES
from .train_node import TRAIN_NODES
from .validation_node import OPTION_NODES as VALIDATION_NODES


class Diff2FlowExtension(ComfyExtension):
    async def get_node_list(self):
        return (list(FLOW_NODES) + list(TRAIN_NODES) + list(REFLOW_NODES) + list(OPTION_NODES)
                + list(ADVANCED_NODES) + list(SCHEDULED_SAMPLING_NODES) + list(VALIDATION_NODES))


async def comfy_entrypoint() -> Diff2FlowExtension:
    return Diff2FlowExtension()
