"""XDP fast path for ChannelData (Linux, root): see ``loader`` and ``service``."""
