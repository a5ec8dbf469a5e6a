"""Attack and audit suite for synthetic sets (the attack issue fills this package)."""
