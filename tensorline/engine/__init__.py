"""The engine: the worker runtime, the Kafka source and sink, the assignor, metrics, client factories and the plugin loader. It imports no stage, fusion or ops module."""
