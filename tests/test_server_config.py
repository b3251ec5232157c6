"""The server's TOML configuration: values, flags over the file, and one sentence for every mistake."""

from __future__ import annotations

import pytest
from conftest import dinofeat
from dinofeat.contract.errors import DinofeatError
from dinofeat_server.service.config import ServerLimits, read_config, serve_settings


def config(tmp_path, text: str):
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_settings_and_limits_are_read_from_their_tables(tmp_path):
    settings, limits = read_config(config(tmp_path, '[server]\nport = 6000\ncache_gb = 2.5\n[server.weights]\n'
                                                    'dinov2_vits14 = "/w/s.pth"\n[limits]\nworkers = 4\nmax_upload_mb = 512\n'))
    assert settings == {"port": 6000, "cache_gb": 2.5, "weights": {"dinov2_vits14": "/w/s.pth"}}
    assert (limits.workers, limits.max_upload_bytes, limits.queue_length) == (4, 512 << 20, ServerLimits().queue_length)


def test_flags_override_the_file_and_the_file_overrides_the_defaults(tmp_path):
    path = config(tmp_path, '[server]\nhost = "0.0.0.0"\nport = 6000\n[server.weights]\na = "file-a"\n[limits]\nworkers = 4\n')
    settings, limits = serve_settings(path, {"port": 7000, "device": None, "weights": {"b": "flag-b"}}, {"workers": None, "queue_length": 3})
    assert (settings["host"], settings["port"], settings["device"]) == ("0.0.0.0", 7000, "auto")
    assert settings["weights"] == {"a": "file-a", "b": "flag-b"}
    assert (limits.workers, limits.queue_length) == (4, 3)


@pytest.mark.parametrize(("text", "message"), [
    ("[limits]\nworkers = 0\n", "workers must be a positive number"),
    ("[limits]\nworkers = \"two\"\n", "workers must be int"),
    ("[limits]\nqueue = 5\n", "[limits] has no setting 'queue'"),
    ("[server]\nport = true\n", "port must be int"),
    ("[serve]\nport = 1\n", "unknown table [serve]"),
    ("[server\nport = 1\n", "is not valid TOML"),
])
def test_mistakes_in_the_file_are_one_sentence(tmp_path, text, message):
    with pytest.raises(DinofeatError, match=None) as caught:
        read_config(config(tmp_path, text))
    assert message in str(caught.value)


def test_serve_with_a_missing_config_file_says_so(tmp_path):
    result = dinofeat("serve", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"dinofeat: error: cannot read the server configuration {tmp_path / 'absent.toml'}: no such file."
