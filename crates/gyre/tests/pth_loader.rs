//! `.pth` (torch.save zip) loading against torch's own files.
//!
//! Fixtures: `tests/fixtures/pth/`, made by `tools/make_pth_fixtures.py` with torch 2.15
//! (`torch.save`, default pickle protocol 2 unless the file says otherwise); damaged files are
//! built by hand there. `expected.json` holds each tensor's dtype, shape and row-major values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gyre::loader::pth::{read_file, read_mapped};
use gyre::loader::safetensors::{map_file, NamedTensor};
use gyre::tensor::DType;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth")
        .join(name)
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str) -> BTreeMap<String, NamedTensor> {
    read_file(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// The full error message for a file that must be refused.
fn error_of(path: &Path) -> String {
    match read_file(path) {
        Ok(t) => panic!("{} loaded {} tensors, expected an error", path.display(), t.len()),
        Err(e) => format!("{e:#}"),
    }
}

/// Checks every tensor of `file` against expected.json, and that no other tensor was read.
fn check_against_expected(file: &str) {
    let all = expected();
    let want = all[file]
        .as_object()
        .unwrap_or_else(|| panic!("{file} not in expected.json"));
    let got = load(file);
    let names: Vec<&String> = got.keys().collect();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    assert_eq!(names, want_names, "{file}: tensor names");
    for (name, spec) in want {
        let t = &got[name].tensor;
        let dtype = match spec["dtype"].as_str().unwrap() {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => panic!("dtype {other}"),
        };
        assert_eq!(t.dtype(), dtype, "{file}: {name} dtype");
        let shape: Vec<usize> = spec["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape(), &shape[..], "{file}: {name} shape");
        let values: Vec<f32> = spec["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        // The fixture values are exact in every dtype, so the comparison is exact.
        assert_eq!(t.to_f32_vec(), values, "{file}: {name} values");
        assert_eq!(got[name].file, fixture(file));
    }
}

#[test]
fn every_dtype_matches_torch() {
    for file in ["f32.pth", "f16.pth", "bf16.pth"] {
        check_against_expected(file);
    }
}

#[test]
fn views_of_one_storage_share_its_bytes() {
    check_against_expected("shared.pth");
    let got = load("shared.pth");
    let base = got["base"].tensor.raw().as_ptr() as usize;
    // `tail` starts one f32 into the same storage, `block` four: views, not copies.
    assert_eq!(got["tail"].tensor.raw().as_ptr() as usize, base + 4);
    assert_eq!(got["block"].tensor.raw().as_ptr() as usize, base + 16);
}

#[test]
fn ordered_dict_state_dict_with_metadata() {
    check_against_expected("ordered.pth");
    let names: Vec<String> = load("ordered.pth").into_keys().collect();
    assert_eq!(names, ["0.bias", "0.weight", "1.bias", "1.weight"]);
}

#[test]
fn wrappers_are_unwrapped_and_other_values_ignored() {
    check_against_expected("wrapped_state_dict.pth");
    check_against_expected("wrapped_model.pth");
}

#[test]
fn non_contiguous_tensors_are_copied_row_major() {
    check_against_expected("transposed.pth");
    let e = error_of(&fixture("expanded.pth"));
    assert!(e.contains("tensor 'e'") && e.contains("contiguous()"), "{e}");
}

#[test]
fn protocol_4_empty_scalar_and_parameter() {
    check_against_expected("protocol4.pth");
    let got = load("protocol4.pth");
    assert_eq!(got["scalar"].tensor.shape(), &[] as &[usize]);
    assert_eq!(got["empty"].tensor.numel(), 0);
}

#[test]
fn large_tensor_points_into_the_file_map() {
    let path = fixture("large.pth");
    let map = map_file(&path).unwrap();
    let got = read_mapped(map.clone(), &path).unwrap();
    let t = &got["big"].tensor;
    assert_eq!(t.shape(), &[128, 128]);
    let values = t.to_f32_vec();
    for (i, v) in values.iter().enumerate() {
        assert_eq!(*v, (i % 251) as f32 * 0.5, "element {i}");
    }
    let (lo, hi) = (map.as_ptr() as usize, map.as_ptr() as usize + map.len());
    let p = t.raw().as_ptr() as usize;
    assert!(p.is_multiple_of(4), "torch aligns storages to 64 bytes");
    assert!(
        lo <= p && p + t.nbytes() <= hi,
        "the tensor's bytes were copied out of the map"
    );
}

#[test]
fn forbidden_global_is_refused_by_name() {
    let e = error_of(&fixture("forbidden_global.pth"));
    assert!(e.contains("forbidden global 'os.system'"), "{e}");
    assert!(e.contains("byte 2") && e.contains("forbidden_global.pth"), "{e}");
}

#[test]
fn unknown_opcode_is_refused_by_name() {
    let e = error_of(&fixture("unknown_opcode.pth"));
    assert!(e.contains("NEWOBJ (0x81)") && e.contains("byte 5"), "{e}");
}

#[test]
fn damaged_storages_name_the_tensor() {
    let e = error_of(&fixture("too_small.pth"));
    assert!(e.contains("tensor 'w'") && e.contains("8 elements"), "{e}");
    let e = error_of(&fixture("short_entry.pth"));
    assert!(e.contains("tensor 'w'") && e.contains("only 8 bytes"), "{e}");
    let e = error_of(&fixture("missing_storage.pth"));
    assert!(
        e.contains("tensor 'b'") && e.contains("missing_storage/data/1"),
        "{e}"
    );
}

#[test]
fn compressed_and_legacy_files_are_explained() {
    let e = error_of(&fixture("compressed.pth"));
    assert!(e.contains("compressed") && e.contains("uncompressed"), "{e}");
    let e = error_of(&fixture("legacy.pth"));
    assert!(
        e.contains("legacy") && e.contains("re-save it with a recent torch"),
        "{e}"
    );
}

fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pth_loader-{}-{name}", std::process::id()))
}

#[test]
fn truncated_archives_are_reported_not_panicked() {
    let bytes = std::fs::read(fixture("f32.pth")).unwrap();
    let path = scratch("truncated.pth");
    for cut in [
        1,
        4,
        30,
        100,
        bytes.len() / 2,
        bytes.len() - 100,
        bytes.len() - 22,
        bytes.len() - 1,
    ] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = error_of(&path);
        assert!(
            e.contains("truncated") || e.contains("not a PyTorch checkpoint"),
            "cut {cut}: {e}"
        );
    }
    std::fs::write(&path, b"").unwrap();
    assert!(error_of(&path).contains("empty"));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn garbage_is_not_a_checkpoint() {
    let path = scratch("garbage.pth");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    let e = error_of(&path);
    assert!(e.contains("not a PyTorch checkpoint"), "{e}");
    // Zip magic followed by garbage.
    std::fs::write(&path, [&b"PK\x03\x04"[..], &garbage].concat()).unwrap();
    let e = error_of(&path);
    assert!(e.contains("not a complete zip archive"), "{e}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn mutated_archives_never_panic() {
    let path = scratch("mutated.pth");
    let mut seed = 0x0123_4567_89ab_cdefu64;
    for file in ["f32.pth", "ordered.pth", "shared.pth"] {
        let good = std::fs::read(fixture(file)).unwrap();
        for _ in 0..300 {
            let mut bytes = good.clone();
            for _ in 0..1 + seed % 8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed >> 8) as usize % bytes.len();
                bytes[at] = (seed >> 40) as u8;
            }
            std::fs::write(&path, &bytes).unwrap();
            // Either outcome is fine; a mutation in tensor bytes still loads.
            let _ = read_file(&path);
        }
    }
    std::fs::remove_file(&path).unwrap();
}
