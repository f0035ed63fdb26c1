"""tensorline: a Kafka-native streaming pipeline for multi-model AI inference."""

__version__ = "0.1.0"
