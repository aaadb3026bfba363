"""Channel groups: which tensor axes of a model share one channel index (derived, never written)."""

from modelfold.graph.groups import ChannelGroup, GroupDiscovery, Slot, discover_groups

__all__ = ["ChannelGroup", "GroupDiscovery", "Slot", "discover_groups"]
