"""Every fuzz target, by name."""
from . import codec, dns, router, translate

TARGETS = {cls.name: cls for mod in (codec, translate, router, dns) for cls in mod.TARGETS}
