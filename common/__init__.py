"""The ground floor: what every process of the testbed may import (no imports from the rooms above)."""
