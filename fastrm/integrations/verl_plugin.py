"""Import this module to register fastrm in verl: ``VERL_USE_EXTERNAL_MODULES=fastrm.integrations.verl_plugin``.

verl imports the modules named in that variable in every process at ``import verl`` (the driver and each Ray
worker), so the registration reaches the workers that compute the losses. ``FASTRM_BACKEND`` picks the backend.
"""

from fastrm.integrations.verl import register

REPORT = register()
