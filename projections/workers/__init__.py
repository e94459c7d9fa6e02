"""Workers that append derived events or change the stream from the views: the liveness
monitor and the sweep reactor (``reactors``), and heartbeat compaction (``compaction``)."""
