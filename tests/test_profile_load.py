"""Loading profiles and DBC files: the shipped profiles load, bad ones are refused by name.

Every refusal is a ConfigError whose message names the file and the dotted key (profile) or the
line (DBC, TOML), because that message is all an operator sees before the daemon exits 78.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.decode.profile import (
    Target,
    compile_index_expression,
    load_dbc,
    load_profile,
    unit_conversion,
)
from gateway.errors import ConfigError

REFERENCE_DBC = Path(__file__).resolve().parent.parent / "dbc" / "bms_reference.dbc"

MINIMAL = f"""
dbc = "{REFERENCE_DBC}"
[pack]
current = "PackCurrent"
"""


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- shipped profiles --------------------------------------------------------------------------


def test_reference_profile_resolves_every_cell_and_sensor(repo: Path) -> None:
    profile = load_profile(repo / "profiles" / "reference.toml")
    assert profile.name == "reference"
    assert profile.node_id_mask == 0xF
    assert profile.serial_from_bus
    assert profile.cell_voltages is not None and profile.cell_temperatures is not None
    # counts come from BMS_Info; buffers are sized by the count signals' DBC maxima
    assert (profile.cell_voltages.count, profile.cell_voltages.capacity) == (None, 256)
    assert (profile.cell_temperatures.count, profile.cell_temperatures.capacity) == (None, 64)
    cells = sorted(b.index for b in profile.bindings if b.target is Target.CELL_VOLTAGE)
    assert cells == list(range(256))
    # block b, value signal j → cell 3b + j, selected by the block signal
    cell_7 = next(b for b in profile.bindings
                  if b.target is Target.CELL_VOLTAGE and b.index == 7)
    assert (cell_7.signal, cell_7.selector, cell_7.selector_value) == \
        ("CellVoltage1", "CellVoltageBlock", 2)
    assert cell_7.factor == pytest.approx(1e-4)
    masks = [b for b in profile.bindings if b.target is Target.CELL_VOLTAGE_INVALID_MASK]
    assert masks[85].bits == ((0, 255),)  # the last block holds one cell of 256


def test_foxbms_profile_needs_a_dbc_and_takes_an_override(repo: Path, realworld: Path) -> None:
    with pytest.raises(ConfigError, match=r"foxbms2\.toml, key 'dbc': is required"):
        load_profile(repo / "profiles" / "foxbms2.toml")
    profile = load_profile(repo / "profiles" / "foxbms2.toml",
                           dbc_override=realworld / "foxbms" / "foxbms.dbc")
    assert profile.cell_voltages is not None and profile.cell_voltages.count == 216
    assert profile.cell_temperatures is not None and profile.cell_temperatures.count == 180
    voltage = next(b for b in profile.bindings
                   if b.target is Target.CELL_VOLTAGE and b.index == 9)
    # mV in the DBC → V; cell 9 sits under multiplexer value 2 of f_CellVoltages
    assert (voltage.message, voltage.selector_value) == ("f_CellVoltages", 2)
    assert voltage.factor == pytest.approx(1e-3)
    assert not profile.serial_from_bus


def test_kona_profile_loads_through_the_missing_section_fix(repo: Path, realworld: Path) -> None:
    with capture_logs() as logs:
        profile = load_profile(repo / "profiles" / "kona.toml",
                               dbc_override=realworld / "kona-bms" / "pcan.dbc")
    inserted = [e for e in logs if e["event"] == "dbc_sections_inserted"]
    assert len(inserted) == 1 and inserted[0]["sections"] == ["BS_", "BU_"]
    assert profile.cell_voltages is None and profile.trigger == "Batt_HV_Status"


def test_volt_profile_lists_96_cells_over_32_multiplexed_frames(repo: Path,
                                                                realworld: Path) -> None:
    profile = load_profile(
        repo / "profiles" / "volt.toml",
        dbc_override=realworld / "opendbc-gm-volt" / "gm_global_a_high_voltage_management.dbc")
    bindings = [b for b in profile.bindings if b.target is Target.CELL_VOLTAGE]
    assert [b.index for b in bindings] == list(range(96))
    assert len({(b.message, b.selector_value) for b in bindings}) == 32
    temp = next(b for b in profile.bindings if b.target is Target.CELL_TEMP and b.index == 6)
    assert (temp.signal, temp.selector, temp.selector_value) == ("Temp_G", "Switch", 1)
    assert (temp.factor, temp.offset) == (0.5, -40.0)  # unit "C" is °C


# -- bad profiles --------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "key", "message"), [
    ("colour = 1", "colour", "unknown key"),
    ("[pack]\ncurrent = 'PackCurrent'\ncurent = 'x'", "pack.curent", "unknown key"),
    ("[pack]\ncurrent = 'NoSuchSignal'", "pack.current", "no signal 'NoSuchSignal'"),
    ("[pack]\ncurrent = 'BMS_Nope.PackCurrent'", "pack.current", "no message 'BMS_Nope'"),
    ("[pack]\ncurrent = 'BMS_CellStats.PackCurrent'", "pack.current",
     "no signal 'PackCurrent' in message 'BMS_CellStats'"),
    ("[pack]\ncurrent = {signal = 'PackCurrent', unit = 'furlong'}", "pack.current",
     "unit 'furlong' is not a current unit"),
    ("[pack]\ncurrent = 'PackCurrent'\nvoltage = {signal = 'PackVoltage', scale = 0}",
     "pack.voltage.scale", "must not be 0"),
    ("[pack]\ncurrent_sign = 2", "pack.current_sign", "must be in -1..1"),
    ("[pack]\nfault_flags = ['FaultFlags', 'Missing']", "pack.fault_flags[1]",
     "no signal 'Missing'"),
    ("node_id_mask = 0x100\n[pack]\ncurrent = 'PackCurrent'", "node_id_mask",
     "has bits inside the node mask"),
    ("node_id_mask = 0x1FF000\n[pack]\ncurrent = 'PackCurrent'", "node_id_mask",
     "at most 8 bits"),
    ("[cell_voltages]\nlayout = 'spiral'", "cell_voltages.layout", "must be one of"),
    ("[cell_voltages]\nlayout = 'multiplexed'\nmessage = 'BMS_CellVoltages'\n"
     "index_signal = 'CellVoltageBlock'\nsignals = ['CellVoltage0']\nindex = 'block * 3 + k'\n"
     "count = 16", "cell_voltages.index", "unknown name 'k'"),
    ("[cell_voltages]\nlayout = 'multiplexed'\nmessage = 'BMS_CellVoltages'\n"
     "index_signal = 'CellVoltageBlock'\nsignals = ['CellVoltage0']\n"
     "index = '__import__(\"os\").getcwd()'\ncount = 16", "cell_voltages.index",
     "is not allowed"),
    ("[cell_voltages]\nlayout = 'multiplexed'\nmessage = 'BMS_CellVoltages'\n"
     "index_signal = 'CellVoltageBlock'\nsignals = ['CellVoltage0', 'CellVoltage1']\n"
     "index = 'block + j'\ncount = 16", "cell_voltages.index", "maps both"),
    ("[cell_voltages]\nlayout = 'multiplexed'\nmessage = 'BMS_CellVoltages'\n"
     "index_signal = 'CellVoltageBlock'\nsignals = ['CellVoltage0']\nindex = 'block'",
     "cell_voltages.count", "is required with the multiplexed layout"),
    ("[cell_voltages]\nlayout = 'multiplexed'\nmessage = 'BMS_CellVoltages'\n"
     "index_signal = 'CellVoltageBlock'\nsignals = ['CellVoltage0', 'CellVoltage9']\n"
     "index = 'block * 2 + j'\ncount = 4", "cell_voltages.signals[1]",
     "no signal 'CellVoltage9' in message 'BMS_CellVoltages'"),
    ("[cell_voltages]\nlayout = 'template'\ntemplate = 'CellVoltage{n}'", "cell_voltages.template",
     "exactly one field"),
    ("[cell_voltages]\nlayout = 'template'\ntemplate = 'Nothing{i}'", "cell_voltages.template",
     "matches no signal"),
    ("[cell_voltages]\nlayout = 'template'\ntemplate = 'CellVoltage{i}'\ncount = 4",
     "cell_voltages.template (i=3)", "no signal 'CellVoltage3'"),
    ("[serial]\nmessage = 'BMS_Identity'\ntext = 'SerialText'\nchunk_index = 'SerialChunkIndex'",
     "serial.chunk_count", "is required with a chunked serial"),
    ("[sample]\nmin_interval_s = -1", "sample.min_interval_s", "must be in"),
    ("[pack]\nvoltage = 'PackVoltage'", "sample.trigger", "is required"),
])
def test_bad_profile_names_file_and_key(tmp_path: Path, body: str, key: str,
                                        message: str) -> None:
    text = f'dbc = "{REFERENCE_DBC}"\n{body}\n'
    if "[pack]" not in body and "[sample]" not in body and "[cell_voltages]" not in body:
        text += "[pack]\ncurrent = 'PackCurrent'\n"
    if "[sample]" in body:
        text += "[pack]\ncurrent = 'PackCurrent'\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert caught.value.path == str(path)
    assert caught.value.key == key
    assert message in str(caught.value)


def test_ambiguous_signal_asks_for_the_message(tmp_path: Path, realworld: Path) -> None:
    path = write(tmp_path, "[pack]\ncurrent = 'Current'\n")
    with pytest.raises(ConfigError, match=r"key 'pack.current': signal 'Current' is in several "
                                          r"messages \(f_PackValuesP0, f_StringValuesP0\)"):
        load_profile(path, dbc_override=realworld / "foxbms" / "foxbms.dbc")


def test_profile_that_is_not_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, f'dbc = "{REFERENCE_DBC}"\n\n[pack\ncurrent = "x"\n')
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert caught.value.line == 3
    assert str(path) in str(caught.value)


def test_missing_profile_and_missing_dbc(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profile file not found"):
        load_profile(tmp_path / "absent.toml")
    path = write(tmp_path, 'dbc = "nowhere.dbc"\n[pack]\ncurrent = "PackCurrent"\n')
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert caught.value.path == str(tmp_path / "nowhere.dbc")
    assert "DBC file not found" in str(caught.value)


def test_dbc_path_is_relative_to_the_profile(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bms.dbc").write_bytes(REFERENCE_DBC.read_bytes())
    path = write(tmp_path, 'dbc = "sub/bms.dbc"\n[pack]\ncurrent = "PackCurrent"\n')
    assert load_profile(path).dbc_path == str(tmp_path / "sub" / "bms.dbc")


# -- bad DBC files -------------------------------------------------------------------------------


@pytest.mark.parametrize(("cut_in", "keep"), [
    ("SG_ CellVoltage1 ", 25),   # mid-signal: cantools alone would drop the signal silently
    ("BO_ 1328 ", 12),           # mid-message header: cantools alone would drop the message
    ("SG_ PackState ", 36),      # inside the (...) of a signal: a syntax error
])
def test_truncated_dbc_names_its_line(tmp_path: Path, cut_in: str, keep: int) -> None:
    lines = REFERENCE_DBC.read_text().splitlines(keepends=True)
    cut = next(n for n, line in enumerate(lines) if cut_in in line)
    dbc = tmp_path / "cut.dbc"
    dbc.write_text("".join(lines[:cut]) + lines[cut][:keep])
    with pytest.raises(ConfigError) as caught:
        load_dbc(dbc)
    assert caught.value.path == str(dbc)
    assert caught.value.line == cut + 1


def test_garbage_dbc_is_refused(tmp_path: Path) -> None:
    dbc = tmp_path / "garbage.dbc"
    dbc.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as caught:
        load_dbc(dbc)
    assert caught.value.path == str(dbc) and caught.value.line == 1


def test_profile_over_a_bad_dbc_reports_the_dbc(tmp_path: Path) -> None:
    dbc = tmp_path / "bad.dbc"
    dbc.write_text('VERSION ""\n\nBS_:\n\nBU_:\n\nBO_ 1 X: 8 N\n SG_ broken\n')
    path = write(tmp_path, 'dbc = "bad.dbc"\n[pack]\ncurrent = "x"\n')
    with pytest.raises(ConfigError) as caught:
        load_profile(path)
    assert (caught.value.path, caught.value.line) == (str(dbc), 8)


def test_a_definition_word_inside_a_comment_is_not_checked(tmp_path: Path) -> None:
    text = REFERENCE_DBC.read_text().replace(
        'CM_ BU_ GATEWAY "bms-gateway, receive only.";',
        'CM_ BU_ GATEWAY "bms-gateway, receive only.\nBO_ 7 NotAMessage: 8 X\n SG_ Nope";')
    dbc = tmp_path / "comment.dbc"
    dbc.write_text(text)
    assert len(load_dbc(dbc).messages) == 7


def test_missing_sections_are_inserted_only_when_that_is_the_problem(tmp_path: Path) -> None:
    text = REFERENCE_DBC.read_text()
    without = text.replace("BS_:\n", "").replace("BU_: BMS GATEWAY\n", "")
    dbc = tmp_path / "nosections.dbc"
    dbc.write_text(without)
    with capture_logs() as logs:
        database = load_dbc(dbc)
    assert database.get_message_by_name("BMS_PackStatus").frame_id == 0x500
    assert [e["sections"] for e in logs if e["event"] == "dbc_sections_inserted"] == \
        [["BS_", "BU_"]]
    # with the sections missing *and* a real error, that error is reported at its own line
    broken = without.replace(" SG_ PackState : 50|3@1+", " SG_ PackState : 50|3@1+ (((")
    dbc.write_text(broken)
    line = next(n for n, ln in enumerate(broken.splitlines(), 1) if "PackState :" in ln)
    with pytest.raises(ConfigError) as caught:
        load_dbc(dbc)
    assert caught.value.line == line


def test_cp1252_dbc_is_read(tmp_path: Path) -> None:
    text = REFERENCE_DBC.read_text().replace('"degC"', '"°C"')
    dbc = tmp_path / "latin.dbc"
    dbc.write_bytes(text.encode("cp1252"))
    database = load_dbc(dbc)
    signal = database.get_message_by_name("BMS_CellStats").get_signal_by_name("MinCellTemp")
    assert signal.unit == "°C"


# -- index expressions and units ------------------------------------------------------------------


@given(st.integers(0, 300), st.integers(0, 8), st.integers(1, 9), st.integers(-5, 5))
def test_index_expression_matches_arithmetic(block: int, j: int, width: int, shift: int) -> None:
    text = f"(block * {width} + j) // 1 - ({shift}) + -(-mux) - i"
    expected = block * width + j - shift
    assert compile_index_expression(text)(block, j) == expected


@pytest.mark.parametrize("text", ["block ** 2", "block % 3", "open('x')", "block.real",
                                  "[block]", "block if j else 0", "1.5 * block", "'a'", "",
                                  "block +"])
def test_index_expression_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        compile_index_expression(text)


def test_index_expression_never_runs_code(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(ValueError):
        compile_index_expression(f"__import__('pathlib').Path({str(marker)!r}).touch() or j")
    assert not marker.exists()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a profile expression must not be eval'd or exec'd")

    expression = compile_index_expression("block * 3 + j")
    monkeypatch.setattr("builtins.eval", forbidden)
    monkeypatch.setattr("builtins.exec", forbidden)
    assert expression(5, 2) == 17


@pytest.mark.parametrize(("target", "unit", "factor", "offset"), [
    (Target.CELL_VOLTAGE, "mV", 1e-3, 0.0),
    (Target.PACK_VOLTAGE, "kV", 1e3, 0.0),
    (Target.CURRENT, "mA", 1e-3, 0.0),
    (Target.CURRENT, "kA", 1e3, 0.0),
    (Target.CELL_TEMP, "degC", 1.0, 0.0),
    (Target.CELL_TEMP, "°C", 1.0, 0.0),
    (Target.CELL_TEMP, "C", 1.0, 0.0),
    (Target.CELL_TEMP, "K", 1.0, -273.15),
    (Target.RATED_CAPACITY, "mAh", 1e-3, 0.0),
    (Target.SOC, "", 1.0, 0.0),
])
def test_units_normalise_to_si(target: Target, unit: str, factor: float, offset: float) -> None:
    assert unit_conversion(target, unit) == pytest.approx((factor, offset))


def test_fahrenheit_and_kelvin_convert_exactly() -> None:
    f_factor, f_offset = unit_conversion(Target.CELL_TEMP, "degF")
    assert 212 * f_factor + f_offset == pytest.approx(100.0)
    assert 32 * f_factor + f_offset == pytest.approx(0.0)
    with pytest.raises(ValueError, match="not a voltage unit"):
        unit_conversion(Target.CELL_VOLTAGE, "mA")


def test_scale_and_unit_override_fold_into_the_binding(tmp_path: Path) -> None:
    path = write(tmp_path, f'dbc = "{REFERENCE_DBC}"\n[pack]\ncurrent_sign = -1\n'
                           "current = {signal = 'PackCurrent', unit = 'mA', scale = 2.0}\n")
    (binding,) = load_profile(path).bindings
    # DBC scale 0.001 A/bit, read as mA (× 0.001), doubled, sign flipped
    assert binding.factor == pytest.approx(-2e-6)
