"""Baselines folding is compared with; they share folding's channel groups and `ratio`.

CNN / graph models: SP-L1 / SP-L2 (`magnitude_prune`), `ifm`, `inn`, `neuron_merging`,
`intra_fusion`, all through `modelfold.baselines.driver.compress`. LLMs: `prune_llm`
(magnitude, Wanda-sp, FLAP, LLM-Pruner without post-tuning).
"""

from modelfold.baselines.ifm import ifm
from modelfold.baselines.inn import inn
from modelfold.baselines.intra_fusion import intra_fusion
from modelfold.baselines.llm import llm_pruning_methods, prune_llm, register_llm_pruning
from modelfold.baselines.magnitude import magnitude_prune
from modelfold.baselines.neuron_merging import neuron_merging

__all__ = ["ifm", "inn", "intra_fusion", "llm_pruning_methods", "magnitude_prune",
           "neuron_merging", "prune_llm", "register_llm_pruning"]
