"""One ensemble engine for every modality (`engine.py`), its routing strategies
(`strategies.py`) and experts loaded from a run (`experts.py`)."""

from orchestrator.ensemble.engine import (
    Combine,
    Dispatch,
    Ensemble,
    ExpertCall,
    ExpertPart,
    ExpertsDown,
    NoHealthyExpert,
    Routing,
)
from orchestrator.ensemble.strategies import STRATEGIES, check_strategy

__all__ = ["STRATEGIES", "Combine", "Dispatch", "Ensemble", "ExpertCall", "ExpertPart",
           "ExpertsDown", "NoHealthyExpert", "Routing", "check_strategy"]
