"""Device profiles (one TOML per target) and on-device helpers; `python -m devices --help`."""
from devices.profile_config import (DeviceProfile, JetsonSettings, ProfileError, TensorRTSettings,
                                    check_backend_available, list_profiles, load_profile, required_extra)

__all__ = ["DeviceProfile", "JetsonSettings", "ProfileError", "TensorRTSettings", "check_backend_available",
           "list_profiles", "load_profile", "required_extra"]
