"""A PC machine on the plugin SDK: SeaBIOS-compatible i440FX/PIIX3 devices booting a disk."""
