"""Settings, from the environment (prefix ``BRIDGE_``) and an optional ``.env`` file.

Every setting is documented in docs/configuration.md and .env.example. Secrets are
``SecretStr`` so they never show up in logs or reprs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # `BRIDGE_SHOPTET_WEBHOOK_KEY=` in an env file means "not set", not "the empty key".
        env_ignore_empty=True,
    )

    # -- the service ------------------------------------------------------------------------
    database_url: str = "sqlite:///bridge.sqlite3"
    mapping_file: Path = Path("bridge.toml")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    max_webhook_bytes: int = Field(64 * 1024, ge=1024)
    # The bridge's address as the platforms see it (https://bridge.example.com): webhooks must
    # point at {public_url}/webhooks/<platform>. Unset: subscriptions are not checked at start.
    public_url: str | None = Field(None, pattern=r"^https?://[^/?#]+[^?#]*$")
    # Register the missing Shoptet webhooks at start (never deletes or repoints any).
    register_webhooks: bool = False

    # -- the worker and delivery ------------------------------------------------------------
    # Hints in hand at once, per platform; also how many reads or look-ups can share one call
    # (Bitrix24 finds up to 2,500 orders by key in one).
    worker_concurrency: int = Field(500, ge=1, le=5000)
    # Longer than the slowest platform call (Shoptet's 80 s timeout), so a slow read is not
    # picked up a second time while it is still running.
    hint_lease_seconds: float = Field(120.0, gt=0)
    read_retry_seconds: float = Field(5.0, gt=0)
    delivery_lease_seconds: float = Field(120.0, gt=0)
    retry_base_seconds: float = Field(2.0, gt=0)
    retry_cap_seconds: float = Field(900.0, gt=0)
    retry_horizon_seconds: float = Field(86_400.0, gt=0)
    idle_check_seconds: float = Field(1.0, gt=0)
    # The full sweep: every order seen in the window is read on every platform and drift is
    # repaired. 0 turns it off.
    sweep_interval_seconds: float = Field(86_400.0, ge=0)
    sweep_window_days: float = Field(30.0, gt=0)

    # -- Shoptet ----------------------------------------------------------------------------
    shoptet_base_url: str = "https://api.myshoptet.com"
    shoptet_api_token: SecretStr | None = None
    shoptet_webhook_key: SecretStr | None = None
    shoptet_eshop_id: int | None = None
    shoptet_content_type: str = "application/json"
    shoptet_timeout_seconds: float = Field(80.0, gt=0)
    shoptet_max_connections: int = Field(3, ge=1, le=3)
    # Shoptet's leaky bucket (per token): about 200 requests, draining 10 per second.
    shoptet_bucket_capacity: int = Field(200, ge=1)
    shoptet_bucket_drain_per_second: float = Field(10.0, gt=0)
    shoptet_poll_interval_seconds: float = Field(300.0, gt=0)
    shoptet_poll_overlap_seconds: float = Field(900.0, ge=0)
    # After a webhook fails verification, re-read the key `bridge shoptet-renew-key` stored at
    # most this often: forged requests must not turn into a store read each.
    shoptet_key_reload_seconds: float = Field(5.0, ge=0)

    # -- MetaKocka --------------------------------------------------------------------------
    metakocka_base_url: str = "https://main.metakocka.si/rest/eshop/v1"
    metakocka_company_id: str | None = None
    metakocka_secret_key: SecretStr | None = None
    metakocka_api_user_email: str | None = None
    metakocka_timeout_seconds: float = Field(60.0, gt=0)
    # Calls in flight at once, reads, writes and polls together.
    metakocka_max_connections: int = Field(4, ge=1, le=16)
    metakocka_poll_interval_seconds: float = Field(60.0, gt=0)
    metakocka_poll_overlap_seconds: float = Field(300.0, ge=0)
    metakocka_batch_size: int = Field(50, ge=1, le=100)
    # -- Bitrix24 ---------------------------------------------------------------------------
    bitrix24_mode: Literal["orders", "deals"] = "orders"
    # Inbound webhook URL, https://<portal>/rest/<user>/<code>/ (a secret: the code is the key)
    bitrix24_webhook_url: SecretStr | None = None
    # or OAuth (a local application): the portal's REST endpoint and the app's credentials
    bitrix24_portal_url: str | None = None
    bitrix24_client_id: str | None = None
    bitrix24_client_secret: SecretStr | None = None
    bitrix24_access_token: SecretStr | None = None
    bitrix24_refresh_token: SecretStr | None = None
    bitrix24_oauth_url: str = "https://oauth.bitrix.info/oauth/token/"
    # auth[application_token] of the outgoing webhook / application: checks incoming events
    bitrix24_application_token: SecretStr | None = None
    # Which field links an order or deal to the order key (default: xmlId / ORIGIN_ID)
    bitrix24_key_field: str | None = None
    bitrix24_deal_category: int = Field(0, ge=0)
    bitrix24_rate_per_second: float = Field(2.0, gt=0)
    bitrix24_burst: int = Field(50, ge=1)
    bitrix24_timeout_seconds: float = Field(50.0, gt=0)
    bitrix24_poll_interval_seconds: float = Field(60.0, gt=0)
    bitrix24_poll_overlap_seconds: float = Field(300.0, ge=0)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the environment variable."""
