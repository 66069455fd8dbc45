"""What `app_defectfill.py` is asked for, as its flags say it: one frozen `AppSettings` (field names are the flags'
dests; `defectfill.cli.settings_from_args` fills it), with the page's starting values and the server as pieces."""

from __future__ import annotations

from dataclasses import dataclass, field

from defectfill.settings import BaseModelSettings, DataSourceSettings


@dataclass(frozen=True)
class PageDefaults:
    """The values the page's settings start at (a visitor changes them per Generate, within the policy's range)."""

    num_candidates: int = 4
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0


@dataclass(frozen=True)
class ServerSettings:
    """Where the app listens and in which mode (public or local, `defectfill.app.policy.serving_mode`)."""

    server_name: str = "127.0.0.1"
    server_port: int = 7860
    share: bool = False
    public: bool = False
    private: bool = False
    public_datasets: bool = True


@dataclass(frozen=True)
class AppSettings:
    """Everything `app_defectfill.py` is asked for. `model` and `data` override the runs' records; `lora` None is
    the bundled demo run."""

    lora: tuple[str, ...] | None = None
    model: BaseModelSettings = field(default_factory=BaseModelSettings)
    data: DataSourceSettings = field(default_factory=DataSourceSettings)
    device: str | None = None
    mixed_precision: str = "auto"
    lpips_net: str = "alex"
    output_dir: str | None = None
    page: PageDefaults = field(default_factory=PageDefaults)
    server: ServerSettings = field(default_factory=ServerSettings)
