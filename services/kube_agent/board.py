"""The kube bus's one state, filled in by the kube-agent's parts: the bus keeps one state per topic, so
two parts publishing KubeState each on its own would take turns erasing the other's fields."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from common.bus.messages import KubeState

# The parts as KubeState.parts names them (and the log, and `gpu-plugin status`).
CONFIG_PART = "per-node configuration"
METRICS_PART = "metrics"
HEALTH_PART = "node health"
# The node-health part's fields; every other field is the per-node configuration's.
NODE_HEALTH_FIELDS = tuple(f.name for f in dataclasses.fields(KubeState)
                           if f.name.startswith(("node_condition", "node_events", "node_health")))


class StatePublisher(Protocol):
    def publish_state(self, state: KubeState) -> KubeState: ...


class KubeBoard:
    """Publishes KubeState: the per-node configuration sends its whole state as before (publish_state),
    node health sets its fields (update); each keeps the other's."""

    def __init__(self, publisher: StatePublisher, node: str, parts: list[str]) -> None:
        self._pub = publisher
        self.state = KubeState(api_reachable=False, node=node, parts=list(parts))

    def publish_state(self, state: KubeState) -> KubeState:
        own = {name: getattr(self.state, name) for name in (*NODE_HEALTH_FIELDS, "parts")}
        self.state = self._pub.publish_state(dataclasses.replace(state, **own))
        return self.state

    def update(self, **fields: Any) -> None:
        """Node health's fields; published when one changed."""
        if any(getattr(self.state, k) != v for k, v in fields.items()):
            self.state = self._pub.publish_state(dataclasses.replace(self.state, **fields))
