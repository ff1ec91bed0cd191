"""fusion_etl: knowledge fusion of LLMs (FuseLLM) as a resumable Ray pipeline."""

__version__ = "0.1.0"
