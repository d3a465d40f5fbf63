"""`edge load`: the MRA load generator (issue #9). See `engine` for how a run is organised."""

from mra_client.load.settings import LoadSettings, LoadSettingsError

__all__ = ["LoadSettings", "LoadSettingsError"]
