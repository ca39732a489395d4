"""Meta-learning algorithms: each one file, a config dataclass, pure loss functions and a ``build``."""
