"""`islands distill`: one dense student trained on a finished ensemble's outputs."""
