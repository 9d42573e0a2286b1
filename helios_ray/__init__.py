"""helios-ray: serve early-exit LLMs the HELIOS way on Ray Serve.

The package is layered so that the pure parts never import Ray or torch at module import time:
``control/`` is plain Python (simulation-testable), ``models/`` and ``engine/`` need torch, and only
``serve/`` touches Ray.
"""

__version__ = "0.1.0"
