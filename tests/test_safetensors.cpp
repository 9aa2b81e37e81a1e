// Tests for r1/safetensors.hpp, r1/io.hpp and the f16 type of r1/numeric.hpp. Golden
// files come from tests/fixtures/gen_safetensors_fixtures.py, an independent Python writer.
#include <r1/io.hpp>
#include <r1/numeric.hpp>
#include <r1/safetensors.hpp>

#include "support.hpp"

#include <stdlib.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using r1::Checkpoint;
using r1::Dtype;
using r1::SafetensorsFile;
using r1::SafetensorsWriter;
using r1::Shape;
using r1::Tensor;

namespace {

const fs::path kGolden = fs::path(R1_FIXTURE_DIR) / "safetensors" / "golden.safetensors";
const fs::path kSharded = fs::path(R1_FIXTURE_DIR) / "safetensors" / "sharded";

// A fresh directory under the system temp dir, removed with everything in it.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "r1_safetensors_XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    path = pattern;
  }
  ~TempDir() { fs::remove_all(path); }
  fs::path operator/(const std::string& name) const { return path / name; }
};

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out);
}

std::string u64_le(uint64_t v) {
  std::string s(8, '\0');
  std::memcpy(s.data(), &v, 8);
  return s;
}

// A safetensors file from a header text and a data section, as a writer would lay it out.
std::string safetensors_bytes(const std::string& header, const std::string& data) { return u64_le(header.size()) + header + data; }

uint32_t float_bits(float x) { return std::bit_cast<uint32_t>(x); }

Tensor<float> random_floats(Shape shape, uint64_t seed, double std = 1.0) {
  Tensor<float> t(shape);
  r1::Rng rng(seed);
  r1::fill_normal(t.view(), rng, 0.0, std);
  return t;
}

// Bitwise equality, so NaNs and signed zeros count.
void require_same_bits(const Tensor<float>& a, const Tensor<float>& b) {
  REQUIRE(a.shape() == b.shape());
  for (int64_t i = 0; i < a.numel(); ++i) {
    INFO("element " << i << ": " << a.data()[i] << " vs " << b.data()[i]);
    REQUIRE(float_bits(a.data()[i]) == float_bits(b.data()[i]));
  }
}

template <class Bits>
std::vector<Bits> raw_elements(const SafetensorsFile& file, const std::string& name) {
  const r1::TensorInfo* t = file.find(name);
  REQUIRE(t != nullptr);
  const auto bytes = file.data(*t);
  std::vector<Bits> out(bytes.size() / sizeof(Bits));
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

Tensor<float> load(const Checkpoint& c, const std::string& name) {
  Tensor<float> t;
  c.load(name, t);
  return t;
}

}  // namespace

// --------------------------------------------------------------------------------------
// f16 (IEEE binary16), the F16 storage type.

// The value of a binary16 code from the IEEE 754 definition, written out independently.
static double f16_spec_value(uint16_t code) {
  const int sign = code >> 15, exponent = (code >> 10) & 0x1F, mantissa = code & 0x3FF;
  double magnitude;
  if (exponent == 0x1F) {
    magnitude = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);
  } else {
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

TEST_CASE("f16: all 65536 codes decode as IEEE binary16; from_float rounds to nearest even", "[numeric]") {
  std::vector<std::pair<double, uint16_t>> finite;
  for (uint32_t code = 0; code < 65536; ++code) {
    const double spec = f16_spec_value(uint16_t(code));
    const float decoded = r1::f16::from_bits(uint16_t(code)).to_float();
    INFO("code " << code);
    if (std::isnan(spec)) {
      REQUIRE(std::isnan(decoded));
      REQUIRE(std::isnan(r1::f16::from_float(decoded).to_float()));
      continue;
    }
    REQUIRE(double(decoded) == spec);
    REQUIRE(std::signbit(decoded) == bool(code & 0x8000));
    REQUIRE(r1::f16::from_float(decoded).bits == code);
    if (!(code & 0x8000)) finite.emplace_back(spec, uint16_t(code));
  }
  std::sort(finite.begin(), finite.end());
  REQUIRE(finite.back().first == INFINITY);
  // Between neighbours (the last pair is 65504 and infinity, whose midpoint 65520 is where
  // IEEE rounding overflows): below the midpoint down, above up, at it to the even code.
  for (std::size_t i = 0; i + 1 < finite.size(); ++i) {
    const auto [lo, lo_code] = finite[i];
    const auto [hi, hi_code] = finite[i + 1];
    const float mid = std::isinf(hi) ? 65520.0f : float((lo + hi) / 2);
    const uint16_t even = lo_code % 2 == 0 ? lo_code : hi_code;
    INFO("between " << lo << " and " << hi);
    REQUIRE(r1::f16::from_float(std::nextafter(mid, 0.0f)).bits == lo_code);
    REQUIRE(r1::f16::from_float(std::nextafter(mid, INFINITY)).bits == hi_code);
    REQUIRE(r1::f16::from_float(mid).bits == even);
    REQUIRE(r1::f16::from_float(-mid).bits == (even | 0x8000));
  }
  REQUIRE(r1::f16::from_float(1e30f).bits == 0x7C00);
  REQUIRE(r1::f16::from_float(-INFINITY).bits == 0xFC00);
  REQUIRE(r1::f16::from_float(1e-30f).bits == 0x0000);
  REQUIRE(r1::f16::from_float(1.0f).bits == 0x3C00);
  REQUIRE(r1::convert_scalar<float>(r1::convert_scalar<r1::f16>(0.1f)) == r1::f16::from_bits(0x2E66).to_float());
}

// --------------------------------------------------------------------------------------
// Golden files from the independent Python writer.

TEST_CASE("golden: F32, F16 and BF16 tensors from an independent writer read back exactly", "[safetensors][golden]") {
  const Checkpoint c = Checkpoint::open(kGolden);
  REQUIRE(c.names() == std::vector<std::string>{"bf16.expected", "bf16.source", "bf16.values", "f16.expected",
                                                 "f16.source", "f16.values", "f32.values", "fp8.expected", "fp8.source",
                                                 "fp8.weight", "fp8.weight_scale_inv", "raw.i64", "scalar"});
  // Later tensors sit at offsets that are not multiples of 4 (the writer used name order).
  REQUIRE(c.info("f16.expected").begin % 4 != 0);

  const Tensor<float> f32 = load(c, "f32.values");
  REQUIRE(f32.shape() == Shape{2, 3});
  const Tensor<float> scalar = load(c, "scalar");
  REQUIRE(scalar.rank() == 0);
  REQUIRE(scalar.data()[0] == 3.5f);

  for (const std::string kind : {"f16", "bf16"}) {
    INFO(kind);
    // Decoding matches torch's conversion back to float ...
    require_same_bits(load(c, kind + ".values"), load(c, kind + ".expected"));
    // ... and r1's rounding from float matches torch's .half() / .bfloat16() bit for bit.
    const SafetensorsFile& file = c.file_of(kind + ".values");
    const std::vector<uint16_t> torch_bits = raw_elements<uint16_t>(file, kind + ".values");
    const Tensor<float> source = load(c, kind + ".source");
    REQUIRE(static_cast<int64_t>(torch_bits.size()) == source.numel());
    for (int64_t i = 0; i < source.numel(); ++i) {
      const float x = source.data()[i];
      INFO("source " << x);
      const uint16_t bits = kind == "f16" ? r1::f16::from_float(x).bits : r1::bf16::from_float(x).bits;
      // NaN payloads and signs differ between torch's conversion paths; NaN must stay NaN.
      if (std::isnan(x)) {
        REQUIRE((bits & 0x7FFF) > (kind == "f16" ? 0x7C00 : 0x7F80));
        continue;
      }
      REQUIRE(bits == torch_bits[i]);
    }
  }

  const SafetensorsFile& file = c.file_of("raw.i64");
  REQUIRE(file.metadata() == nlohmann::json{{"format", "pt"}, {"producer", "gen_safetensors_fixtures.py"}});
  REQUIRE(c.info("raw.i64").dtype == Dtype::I64);
  REQUIRE(raw_elements<int64_t>(file, "raw.i64") == std::vector<int64_t>{-1, 0, int64_t{1} << 40});
  Tensor<float> out;
  REQUIRE_R1_ERROR(c.load("raw.i64", out), "tensor 'raw.i64' in '" + kGolden.string() + "' has dtype I64, which does not convert to float");
}

TEST_CASE("golden FP8: dequantization matches the reference, r1's quantizer reproduces its codes and scales",
          "[safetensors][golden][fp8]") {
  const Checkpoint c = Checkpoint::open(kGolden);
  // Dequantized: e4m3 value times the block's scale, in float, exactly as the reference.
  const Tensor<float> dequantized = load(c, "fp8.weight");
  REQUIRE(dequantized.shape() == Shape{130, 140});
  require_same_bits(dequantized, load(c, "fp8.expected"));

  const Checkpoint::Fp8Weight stored = c.load_fp8("fp8.weight");
  REQUIRE(stored.codes.shape() == Shape{130, 140});
  REQUIRE(stored.scale_inv.shape() == Shape{2, 2});
  require_same_bits(stored.scale_inv, load(c, "fp8.weight_scale_inv"));
  REQUIRE(stored.scale_inv(1, 1) == 1e-4f / 448.0f);  // the all-zero block: amax clamped to 1e-4

  // Quantizing the same BF16 source gives the reference's codes (ties included: block (0,0)
  // scales by exactly 1024) and scales.
  SafetensorsWriter writer;
  writer.add_fp8_block_scaled("w", load(c, "fp8.source"));
  const TempDir dir;
  writer.write(dir / "w.safetensors");
  const Checkpoint::Fp8Weight mine = Checkpoint::open(dir / "w.safetensors").load_fp8("w");
  REQUIRE(std::memcmp(mine.codes.data(), stored.codes.data(), 130 * 140) == 0);
  require_same_bits(mine.scale_inv, stored.scale_inv);
}

TEST_CASE("golden sharded checkpoint: model.safetensors.index.json and HF names", "[safetensors][golden]") {
  const nlohmann::json expected = [] {
    std::ifstream in(kSharded / "expected.json");
    REQUIRE(in);
    return nlohmann::json::parse(in);
  }();
  const Checkpoint c = Checkpoint::open(kSharded);
  std::vector<std::string> names;
  for (const auto& [name, value] : expected.items()) names.push_back(name);
  REQUIRE(c.names() == names);
  for (const auto& [name, value] : expected.items()) {
    INFO(name);
    Tensor<float> t;
    c.load(name, t, r1test::shape_of(value));
    const auto& data = value.at("data");
    for (int64_t i = 0; i < t.numel(); ++i) REQUIRE(t.data()[i] == data[i].get<float>());
  }
  REQUIRE(c.file_of("lm_head.weight").path().filename() == "model-00002-of-00002.safetensors");
  REQUIRE(c.info("lm_head.weight").dtype == Dtype::F8_E4M3);
  // The FP8 weight's scales count as expected alongside it.
  c.check_names({"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.gate.e_score_correction_bias",
                 "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.norm.weight"});
}

// --------------------------------------------------------------------------------------
// Round trips through r1's writer.

TEST_CASE("round trip: F32, F16 and BF16 store the rounded values; strided views are gathered", "[safetensors]") {
  Tensor<float> x = random_floats(Shape{3, 5, 7}, 1, 10.0);
  x.data()[0] = 70000.0f;  // overflows F16 to infinity, fits BF16
  x.data()[1] = -0.0f;
  x.data()[2] = std::numeric_limits<float>::quiet_NaN();
  x.data()[3] = 1e-6f;  // an F16 subnormal
  const Tensor<float> matrix = random_floats(Shape{4, 6}, 2);
  SafetensorsWriter writer;
  writer.add("x.f32", x);
  writer.add("x.f16", x, Dtype::F16);
  writer.add("x.bf16", x, Dtype::BF16);
  writer.add("columns", matrix.view().slice(1, 2, 5));  // strided: rows of 3 out of 6
  const TempDir dir;
  writer.write(dir / "model.safetensors");

  const Checkpoint c = Checkpoint::open(dir.path);  // a directory with model.safetensors
  require_same_bits(load(c, "x.f32"), x);
  Tensor<float> f16_expected = x, bf16_expected = x;
  for (int64_t i = 0; i < x.numel(); ++i) {
    f16_expected.data()[i] = r1::f16::from_float(x.data()[i]).to_float();
    bf16_expected.data()[i] = r1::bf16::from_float(x.data()[i]).to_float();
  }
  REQUIRE(std::isinf(f16_expected.data()[0]));
  require_same_bits(load(c, "x.f16"), f16_expected);
  require_same_bits(load(c, "x.bf16"), bf16_expected);
  require_same_bits(load(c, "columns"), r1::to_tensor(matrix.view().slice(1, 2, 5)));
  REQUIRE(c.info("x.f16").dtype == Dtype::F16);
  REQUIRE(c.info("x.bf16").shape == std::vector<int64_t>{3, 5, 7});
}

TEST_CASE("byte layout of r1-written files: padded header, HF order, aligned contiguous offsets", "[safetensors]") {
  SafetensorsWriter writer;
  const Tensor<float> a = random_floats(Shape{3}, 3), b = random_floats(Shape{5}, 4), w = random_floats(Shape{2, 3}, 5);
  writer.add("b", b, Dtype::BF16);  // 10 bytes: an F32 tensor after it would be misaligned
  writer.add("a", a);
  writer.add("z", a);
  writer.add_fp8_block_scaled("w", w);
  writer.set_metadata("step", "7");
  const TempDir dir;
  writer.write(dir / "m.safetensors");
  const std::string bytes = read_bytes(dir / "m.safetensors");

  uint64_t header_length = 0;
  std::memcpy(&header_length, bytes.data(), 8);
  REQUIRE(header_length % 8 == 0);
  const std::string header_text = bytes.substr(8, header_length);
  const std::size_t json_end = header_text.find_last_not_of(' ') + 1;
  REQUIRE(header_length - json_end < 8);  // only the padding is spaces
  REQUIRE(header_text[json_end - 1] == '}');
  // ordered_json keeps the file's order: metadata first, then the tensors as laid out.
  const nlohmann::ordered_json header = nlohmann::ordered_json::parse(header_text);
  REQUIRE(header.at("__metadata__") == nlohmann::ordered_json{{"format", "pt"}, {"step", "7"}});
  std::vector<std::string> order;
  std::size_t offset = 0;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    order.push_back(name);
    const auto offsets = entry.at("data_offsets").get<std::vector<std::size_t>>();
    REQUIRE(offsets[0] == offset);
    const std::map<std::string, std::size_t> element_size = {{"F32", 4}, {"BF16", 2}, {"F8_E4M3", 1}};
    REQUIRE((8 + header_length + offsets[0]) % element_size.at(entry.at("dtype").get<std::string>()) == 0);
    offset = offsets[1];
  }
  // Wider dtypes first, then by name.
  REQUIRE(order == std::vector<std::string>{"a", "w_scale_inv", "z", "b", "w"});
  REQUIRE(bytes.size() == 8 + header_length + offset);
  REQUIRE(header.at("w").at("shape") == nlohmann::ordered_json{2, 3});
  REQUIRE(header.at("w").at("dtype") == "F8_E4M3");
  REQUIRE(std::memcmp(bytes.data() + 8 + header_length, a.data(), 12) == 0);  // "a" is first, raw float32
}

TEST_CASE("FP8 block scaling with shapes that are not multiples of 128 (200 x 300)", "[safetensors][fp8]") {
  // Blocks of different magnitudes, so a scale taken from the wrong block shows.
  Tensor<float> w = random_floats(Shape{200, 300}, 6);
  for (int64_t r = 0; r < 200; ++r)
    for (int64_t c = 0; c < 300; ++c) w(r, c) *= std::ldexp(1.0f, int(r / 128) * 3 + int(c / 128) * 2 - 4);
  SafetensorsWriter writer;
  writer.add_fp8_block_scaled("model.layers.0.mlp.down_proj.weight", w);
  const TempDir dir;
  writer.write(dir / "fp8.safetensors");
  const Checkpoint c = Checkpoint::open(dir / "fp8.safetensors");
  REQUIRE(c.info("model.layers.0.mlp.down_proj.weight_scale_inv").shape == std::vector<int64_t>{2, 3});

  const Checkpoint::Fp8Weight q = c.load_fp8("model.layers.0.mlp.down_proj.weight");
  REQUIRE(q.codes.shape() == Shape{200, 300});
  REQUIRE(q.scale_inv.shape() == Shape{2, 3});
  for (int64_t bi = 0; bi < 2; ++bi) {
    for (int64_t bj = 0; bj < 3; ++bj) {
      float amax = 0.0f;
      for (int64_t r = bi * 128; r < std::min<int64_t>(200, bi * 128 + 128); ++r)
        for (int64_t col = bj * 128; col < std::min<int64_t>(300, bj * 128 + 128); ++col) amax = std::max(amax, std::abs(w(r, col)));
      REQUIRE(q.scale_inv(bi, bj) == amax / 448.0f);
    }
  }
  // Each value is within half an e4m3 step of the original: 2^-4 relative for normals,
  // scale * 2^-10 absolute in the subnormal range.
  Tensor<float> dequantized;
  c.load("model.layers.0.mlp.down_proj.weight", dequantized, Shape{200, 300});
  for (int64_t r = 0; r < 200; ++r) {
    for (int64_t col = 0; col < 300; ++col) {
      const float scale = q.scale_inv(r / 128, col / 128);
      INFO("(" << r << ", " << col << ")");
      REQUIRE(dequantized(r, col) == q.codes(r, col).to_float() * scale);
      REQUIRE(std::abs(dequantized(r, col) - w(r, col)) <= 1.0001f * std::max(std::abs(w(r, col)) / 16, scale / 1024));
    }
  }

  // Kept as FP8: load() refuses the weight, load_fp8() and the scales still work.
  const Checkpoint kept = Checkpoint::open(dir / "fp8.safetensors", {.dequantize_fp8 = false});
  REQUIRE_R1_ERROR(kept.load("model.layers.0.mlp.down_proj.weight", dequantized),
                   "[checkpoint.load] tensor 'model.layers.0.mlp.down_proj.weight' is an FP8 weight with block scales and "
                   "dequantize_fp8 is off: read it with load_fp8");
  REQUIRE(std::memcmp(kept.load_fp8("model.layers.0.mlp.down_proj.weight").codes.data(), q.codes.data(), 200 * 300) == 0);
  require_same_bits(load(kept, "model.layers.0.mlp.down_proj.weight_scale_inv"), q.scale_inv);
}

TEST_CASE("sharded round trip: shards by size, index with total_size and weight_map", "[safetensors]") {
  SafetensorsWriter writer;
  const Tensor<float> small = random_floats(Shape{10}, 7), big = random_floats(Shape{100}, 8);
  writer.add("a", small);            // 40 bytes
  writer.add("b", small, Dtype::BF16);  // 20 bytes: fits with a
  writer.add("c", big);              // 400 bytes: more than the limit, alone in its shard
  writer.add("d", small);            // 40 bytes
  const TempDir dir;
  writer.write_sharded(dir / "ckpt", 64);

  const nlohmann::json index = nlohmann::json::parse(read_bytes(dir / "ckpt" / "model.safetensors.index.json"));
  REQUIRE(index.at("metadata").at("total_size") == 40 + 20 + 400 + 40);
  REQUIRE(index.at("weight_map") == nlohmann::json{{"a", "model-00001-of-00003.safetensors"},
                                                   {"b", "model-00001-of-00003.safetensors"},
                                                   {"c", "model-00002-of-00003.safetensors"},
                                                   {"d", "model-00003-of-00003.safetensors"}});
  REQUIRE(SafetensorsFile::open(dir / "ckpt" / "model-00003-of-00003.safetensors").metadata() == nlohmann::json{{"format", "pt"}});

  const Checkpoint c = Checkpoint::open(dir / "ckpt");
  REQUIRE(c.names() == std::vector<std::string>{"a", "b", "c", "d"});
  require_same_bits(load(c, "c"), big);
  require_same_bits(load(c, "d"), small);
  REQUIRE(load(c, "b").data()[3] == r1::bf16::from_float(small.data()[3]).to_float());
}

TEST_CASE("write_file_atomic: a failed write leaves the old file and no temporary file", "[io]") {
  const TempDir dir;
  const fs::path target = dir / "model.safetensors";
  r1::write_file_atomic(target, [](std::ostream& out) { out << "old contents"; });
  REQUIRE(read_bytes(target) == "old contents");

  const auto only_target_left = [&] {
    std::vector<fs::path> entries(fs::directory_iterator(dir.path), fs::directory_iterator{});
    return entries == std::vector<fs::path>{target};
  };
  // The callback's own exception propagates unchanged.
  REQUIRE_THROWS_WITH(r1::write_file_atomic(target,
                                            [](std::ostream& out) {
                                              out << std::string(3 << 20, 'x');  // past the first buffer flush
                                              throw std::runtime_error("disk on fire");
                                            }),
                      "disk on fire");
  REQUIRE(read_bytes(target) == "old contents");
  REQUIRE(only_target_left());

  // A writer that fails mid-way through a checkpoint: the same.
  SafetensorsWriter writer;
  writer.add("x", random_floats(Shape{4}, 9));
  REQUIRE_R1_ERROR(writer.write(dir / "missing_dir" / "model.safetensors"), "[write_file_atomic] cannot create");
  REQUIRE(only_target_left());

  // A successful write replaces the file.
  writer.write(target);
  REQUIRE(SafetensorsFile::open(target).find("x") != nullptr);
  REQUIRE(only_target_left());
}

// --------------------------------------------------------------------------------------
// .npy

TEST_CASE("npy: round trip, numpy's header layout, files written by numpy", "[io][npy]") {
  const TempDir dir;
  for (const Shape& shape : {Shape{}, Shape{5}, Shape{2, 3}, Shape{2, 1, 4}, Shape{2, 0, 3, 1}}) {
    INFO("shape " << shape.str());
    const Tensor<float> x = random_floats(shape, 10);
    r1::write_npy(dir / "x.npy", x);
    require_same_bits(r1::read_npy(dir / "x.npy"), x);
  }
  const Tensor<float> m = random_floats(Shape{2, 3}, 11);
  r1::write_npy(dir / "m.npy", m);
  const std::string bytes = read_bytes(dir / "m.npy");
  REQUIRE(bytes.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  const std::size_t header_length = uint8_t(bytes[8]) | (uint8_t(bytes[9]) << 8);
  REQUIRE((10 + header_length) % 64 == 0);
  const std::string header = bytes.substr(10, header_length);
  REQUIRE(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
  REQUIRE(header.back() == '\n');
  REQUIRE(bytes.size() == 10 + header_length + 24);

  r1::write_npy(dir / "v.npy", random_floats(Shape{5}, 12));
  REQUIRE(read_bytes(dir / "v.npy").find("'shape': (5,), }") != std::string::npos);

  // A strided view is written in C order.
  r1::write_npy(dir / "cols.npy", m.view().slice(1, 1, 3));
  require_same_bits(r1::read_npy(dir / "cols.npy"), r1::to_tensor(m.view().slice(1, 1, 3)));

  for (const char* file : {"numpy_v1.npy", "numpy_v2.npy"}) {
    INFO(file);
    const Tensor<float> y = r1::read_npy(fs::path(R1_FIXTURE_DIR) / "safetensors" / file);
    REQUIRE(y.shape() == Shape{2, 3, 4});
    for (int64_t i = 0; i < 24; ++i) REQUIRE(y.data()[i] == 0.5f * float(i) - 3.0f);
  }
}

TEST_CASE("npy: other dtypes, Fortran order, bad magic and wrong sizes are errors", "[io][npy]") {
  const TempDir dir;
  const auto npy = [&](const std::string& dict, const std::string& data) {
    std::string header = dict;
    header.append(63 - (10 + header.size()) % 64, ' ');
    header += '\n';
    std::string bytes = std::string("\x93NUMPY\x01\x00", 8) + char(header.size() & 0xFF) + char(header.size() >> 8) + header + data;
    write_bytes(dir / "bad.npy", bytes);
    return dir / "bad.npy";
  };
  const std::string name = (dir / "bad.npy").string();
  REQUIRE_R1_ERROR(r1::read_npy(npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", std::string(16, '\0'))),
                   "[read_npy] '" + name + "' is not little-endian float32");
  REQUIRE_R1_ERROR(r1::read_npy(npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", std::string(8, '\0'))),
                   "is not little-endian float32");
  REQUIRE_R1_ERROR(r1::read_npy(npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", std::string(16, '\0'))),
                   "is not in C order");
  REQUIRE_R1_ERROR(r1::read_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", std::string(20, '\0'))),
                   "has 20 data bytes, not the 4 per element that shape [2, 3] needs");
  REQUIRE_R1_ERROR(r1::read_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }", "")),
                   "not the 4 per element");
  REQUIRE_R1_ERROR(r1::read_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }", "")), "has a malformed shape");
  REQUIRE_R1_ERROR(r1::read_npy(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 1), }", "")),
                   "has more than 4 dims");
  write_bytes(dir / "bad.npy", "PK\x03\x04 not an npy file");
  REQUIRE_R1_ERROR(r1::read_npy(dir / "bad.npy"), "is not a .npy file");
  write_bytes(dir / "bad.npy", std::string("\x93NUMPY\x01\x00\xff\x00{}", 12));
  REQUIRE_R1_ERROR(r1::read_npy(dir / "bad.npy"), "header length 255 runs past the end of the file");
  REQUIRE_R1_ERROR(r1::read_npy(dir / "absent.npy"), "[read_npy] cannot open '" + (dir / "absent.npy").string() + "'");
}

// --------------------------------------------------------------------------------------
// Validation: crafted broken files.

TEST_CASE("safetensors validation: each malformed file is an r1::error naming file and tensor", "[safetensors][validation]") {
  const TempDir dir;
  const fs::path path = dir / "bad.safetensors";
  const std::string file = "'" + path.string() + "'";
  const auto open_bytes = [&](const std::string& bytes) {
    write_bytes(path, bytes);
    return SafetensorsFile::open(path);
  };
  const auto open_header = [&](const std::string& header, std::size_t data_bytes) {
    return open_bytes(safetensors_bytes(header, std::string(data_bytes, '\0')));
  };
  const auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape, int begin, int end) {
    return fmt::format("\"{}\":{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}", name, dtype, shape, begin, end);
  };

  // A valid file to start from: two tensors tiling 40 bytes.
  const std::string a = entry("a", "F32", "[2,3]", 0, 24), b = entry("b", "F16", "[8]", 24, 40);
  REQUIRE(open_header("{" + a + "," + b + "}", 40).tensors().size() == 2);

  SECTION("header length") {
    REQUIRE_R1_ERROR(open_bytes(std::string("\x05\x00\x00", 3)), "[safetensors.open] " + file + " has 3 bytes, too few for the 8-byte header length");
    REQUIRE_R1_ERROR(open_bytes(u64_le(200'000'000) + "{}"), file + " declares a header of 200000000 bytes, more than the limit of 100000000");
    REQUIRE_R1_ERROR(open_bytes(u64_le(20) + "{}"), file + " declares a header of 20 bytes but has only 2 after the length");
    REQUIRE_R1_ERROR(open_bytes(u64_le(~uint64_t{0}) + "{}"), "more than the limit");
  }
  SECTION("header JSON") {
    REQUIRE_R1_ERROR(open_header("{\"a\":", 0), file + " has a header that is not valid JSON");
    REQUIRE_R1_ERROR(open_header("[1, 2]", 0), file + " has a header that is not a JSON object");
    REQUIRE_R1_ERROR(open_header("{\"a\": 3}", 0), file + ": tensor 'a' is not described by an object");
    REQUIRE_R1_ERROR(open_header("{\"__metadata__\": []}", 0), "__metadata__ is not an object");
    REQUIRE_R1_ERROR(open_header("{\"__metadata__\": {\"step\": 7}}", 0), "__metadata__ value of 'step' is not a string");
  }
  SECTION("entries") {
    REQUIRE_R1_ERROR(open_header("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4), "tensor 'a' has no \"dtype\"");
    REQUIRE_R1_ERROR(open_header("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4), "tensor 'a' has no \"shape\"");
    REQUIRE_R1_ERROR(open_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4), "tensor 'a' has no \"data_offsets\"");
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F12", "[1]", 0, 4) + "}", 4), "tensor 'a' has unknown dtype \"F12\"");
    REQUIRE_R1_ERROR(open_header("{\"a\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4), "tensor 'a' has a dtype that is not a string");
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "[-1]", 0, 4) + "}", 4),
                     "tensor 'a' has a shape [-1] with an entry that is not a non-negative integer");
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "[1.5]", 0, 4) + "}", 4), "not a non-negative integer");
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "7", 0, 4) + "}", 4), "tensor 'a' has a shape that is not an array");
    REQUIRE_R1_ERROR(open_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4),
                     "tensor 'a' has data_offsets [0], not two non-negative integers");
  }
  SECTION("offsets and sizes") {
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "[1]", 4, 0) + "}", 4), "tensor 'a' has data_offsets [4,0] that end before they begin");
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "[2]", 0, 8) + "}", 4),
                     file + ": tensor 'a' has data_offsets [0,8] past the end of the 4-byte data section");
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "[2,3]", 0, 20) + "}", 20),
                     "tensor 'a' with dtype F32 and shape [2,3] needs 24 bytes, its data_offsets [0,20] hold 20");
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "[4294967296,4294967296,4294967296]", 0, 8) + "}", 8),
                     "needs more bytes");
  }
  SECTION("overlaps, gaps and trailing bytes") {
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "[2,3]", 0, 24) + "," + entry("b", "F16", "[8]", 20, 36) + "}", 36),
                     file + ": tensor 'b' at [20, 36) overlaps tensor 'a', which ends at 24");
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "[2,3]", 0, 24) + "," + entry("b", "F32", "[2,3]", 0, 24) + "}", 24),
                     "tensor 'b' at [0, 24) overlaps tensor 'a'");
    REQUIRE_R1_ERROR(open_header("{" + entry("a", "F32", "[2,3]", 0, 24) + "," + entry("b", "F16", "[8]", 28, 44) + "}", 44),
                     file + ": gap of 4 unused bytes before tensor 'b' at offset 28");
    REQUIRE_R1_ERROR(open_header("{" + a + "," + b + "}", 48), file + ": 8 trailing bytes after the last tensor 'b'");
  }
  SECTION("not a file") {
    REQUIRE_R1_ERROR(SafetensorsFile::open(dir / "absent.safetensors"),
                     "[safetensors.open] cannot open '" + (dir / "absent.safetensors").string() + "': No such file or directory");
    REQUIRE_R1_ERROR(SafetensorsFile::open(dir.path), "[safetensors.open] '" + dir.path.string() + "' is not a regular file");
  }
}

TEST_CASE("checkpoint errors: paths, broken indexes, absent tensors, wrong shapes and scales", "[safetensors][validation]") {
  const TempDir dir;
  SECTION("paths") {
    REQUIRE_R1_ERROR(Checkpoint::open(dir / "absent"), "[checkpoint.open] '" + (dir / "absent").string() + "' does not exist");
    REQUIRE_R1_ERROR(Checkpoint::open(dir.path), "[checkpoint.open] directory '" + dir.path.string() +
                                                     "' has neither model.safetensors.index.json nor model.safetensors");
  }
  SECTION("indexes") {
    SafetensorsWriter writer;
    writer.add("a", random_floats(Shape{2}, 13));
    writer.add("b", random_floats(Shape{2}, 14));
    writer.write(dir / "s1.safetensors");
    const std::string index = "'" + (dir / "model.safetensors.index.json").string() + "'";
    const auto open_index = [&](const std::string& json) {
      write_bytes(dir / "model.safetensors.index.json", json);
      return Checkpoint::open(dir.path);
    };
    REQUIRE_R1_ERROR(open_index("{\"weight_map\": "), "[checkpoint.open] " + index + " is not valid JSON");
    REQUIRE_R1_ERROR(open_index("{\"metadata\": {}}"), index + " has no \"weight_map\" object");
    REQUIRE_R1_ERROR(open_index(R"({"weight_map": {"a": 1}})"), index + " maps tensor 'a' to 1, not a file name");
    REQUIRE_R1_ERROR(open_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})"),
                     index + " maps tensor 'b' to 's2.safetensors', which does not exist");
    REQUIRE_R1_ERROR(open_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s1.safetensors"}})"),
                     index + " maps tensor 'c' to 's1.safetensors', which does not contain it");
    REQUIRE_R1_ERROR(open_index(R"({"weight_map": {"a": "s1.safetensors"}})"),
                     index + " does not list tensor 'b' of shard 's1.safetensors'");
    fs::copy_file(dir / "s1.safetensors", dir / "s2.safetensors");
    REQUIRE_R1_ERROR(open_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})"),
                     index + " maps tensor 'b' to 's2.safetensors', but shard 's1.safetensors' holds it too");
    // The index wins over a model.safetensors beside it.
    writer.write(dir / "model.safetensors");
    REQUIRE(open_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})").file_of("a").path() ==
            dir / "s1.safetensors");
  }
  SECTION("tensors") {
    SafetensorsWriter writer;
    writer.add("x", random_floats(Shape{2, 3}, 15));
    writer.add_fp8_block_scaled("w", random_floats(Shape{130, 4}, 16));
    writer.write(dir / "m.safetensors");
    const std::string file = (dir / "m.safetensors").string();
    const Checkpoint c = Checkpoint::open(dir / "m.safetensors");
    Tensor<float> out;
    REQUIRE_R1_ERROR(c.info("y"), "[checkpoint.info] no tensor 'y' in checkpoint '" + file + "'");
    REQUIRE_R1_ERROR(c.load("y", out), "[checkpoint.load] no tensor 'y'");
    REQUIRE_R1_ERROR(c.load("x", out, Shape{3, 2}),
                     "[checkpoint.load] tensor 'x' in '" + file + "' has shape [2, 3], expected [3, 2]");
    REQUIRE_R1_ERROR(c.load_fp8("x"), "[checkpoint.load_fp8] tensor 'x' in '" + file + "' has dtype F32, not F8_E4M3");
    REQUIRE(load(c, "w").shape() == Shape{130, 4});
    REQUIRE(c.load_fp8("w").scale_inv.shape() == Shape{2, 1});
    // An F8 weight whose scales have the wrong shape: [1, 2] for a [2, 2] weight.
    const std::string codes(4, '\x38');  // four 1.0 codes
    write_bytes(dir / "scale.safetensors",
                safetensors_bytes(R"({"w_scale_inv":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},)"
                                  R"("w":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[8,12]}})",
                                  std::string(8, '\0') + codes));
    const Checkpoint s = Checkpoint::open(dir / "scale.safetensors");
    REQUIRE_R1_ERROR(s.load("w", out), "[checkpoint.load] tensor 'w_scale_inv' in '" + (dir / "scale.safetensors").string() +
                                           "' has shape [1, 2], expected [1, 1]");
    REQUIRE_R1_ERROR(s.load_fp8("w"), "has shape [1, 2], expected [1, 1]");
    // A rank-5 tensor is valid in the file but not loadable into an r1 tensor.
    write_bytes(dir / "rank5.safetensors", safetensors_bytes(R"({"r":{"dtype":"F32","shape":[1,1,1,1,1],"data_offsets":[0,4]}})",
                                                             std::string(4, '\0')));
    REQUIRE_R1_ERROR(Checkpoint::open(dir / "rank5.safetensors").load("r", out),
                     "[checkpoint.load] tensor 'r' has rank 5, r1 tensors hold at most 4");
    // An F8 tensor without scales: plain e4m3 values for load(), an error for load_fp8().
    write_bytes(dir / "plain.safetensors", safetensors_bytes(R"({"p":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", codes));
    const Checkpoint p = Checkpoint::open(dir / "plain.safetensors");
    REQUIRE(load(p, "p").data()[3] == 1.0f);
    REQUIRE_R1_ERROR(p.load_fp8("p"), "[checkpoint.load_fp8] FP8 tensor 'p' has no 'p_scale_inv' with its block scales");
  }
}

TEST_CASE("check_names: counts and first names of missing and unexpected tensors", "[safetensors][validation]") {
  const TempDir dir;
  SafetensorsWriter writer;
  writer.add("model.norm.weight", random_floats(Shape{4}, 20));
  writer.add("model.extra", random_floats(Shape{4}, 21));
  writer.add("model.zz_extra", random_floats(Shape{4}, 22));
  writer.add_fp8_block_scaled("model.layers.0.mlp.down_proj.weight", random_floats(Shape{4, 4}, 23));
  writer.add("model.norm.weight_scale_inv", random_floats(Shape{1}, 24));  // not FP8's companion: norm is F32
  writer.write(dir / "m.safetensors");
  const Checkpoint c = Checkpoint::open(dir / "m.safetensors");
  const std::string file = "'" + (dir / "m.safetensors").string() + "'";
  c.check_names({"model.norm.weight", "model.extra", "model.zz_extra", "model.layers.0.mlp.down_proj.weight",
                 "model.norm.weight_scale_inv"});
  REQUIRE_R1_ERROR(c.check_names({"model.norm.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight",
                                  "model.embed_tokens.weight"}),
                   "[checkpoint.check_names] " + file +
                       ": 2 missing (first: 'lm_head.weight'), 3 unexpected (first: 'model.extra') tensors");
  REQUIRE_R1_ERROR(c.check_names({"model.norm.weight", "model.extra", "model.zz_extra", "model.norm.weight_scale_inv"}),
                   ": 0 missing, 2 unexpected (first: 'model.layers.0.mlp.down_proj.weight') tensors");
}

TEST_CASE("writer errors: duplicates, unsupported dtypes, non-2-D FP8, non-finite values", "[safetensors][validation]") {
  SafetensorsWriter writer;
  const Tensor<float> x = random_floats(Shape{2, 2}, 25);
  writer.add("x", x);
  REQUIRE_R1_ERROR(writer.add("x", x), "[safetensors.add] tensor 'x' was already added");
  REQUIRE_R1_ERROR(writer.add("", x), "[safetensors.add] empty tensor name");
  REQUIRE_R1_ERROR(writer.add("__metadata__", x), "'__metadata__' is reserved");
  REQUIRE_R1_ERROR(writer.add("bad\xff", x), "tensor name 'bad\xff' is not valid UTF-8");
  REQUIRE_R1_ERROR(writer.add("y", x, Dtype::F8_E4M3), "[safetensors.add] tensor 'y': cannot store as F8_E4M3");
  REQUIRE_R1_ERROR(writer.add("y", x, Dtype::I32), "cannot store as I32");
  REQUIRE_R1_ERROR(writer.add_fp8_block_scaled("v", random_floats(Shape{2, 2, 2}, 26)),
                   "[safetensors.add_fp8_block_scaled] tensor 'v' has shape [2, 2, 2], block scaling needs a 2-D weight");
  writer.add("w_scale_inv", x);
  REQUIRE_R1_ERROR(writer.add_fp8_block_scaled("w", x), "[safetensors.add_fp8_block_scaled] tensor 'w_scale_inv' was already added");
  Tensor<float> inf = x;
  inf(1, 0) = INFINITY;
  REQUIRE_R1_ERROR(writer.add_fp8_block_scaled("u", inf), "[safetensors.add_fp8_block_scaled] tensor 'u' has inf at (1, 0)");
  REQUIRE_R1_ERROR(writer.set_metadata("k", "\xc3"), "[safetensors.set_metadata] key 'k' or its value is not valid UTF-8");
  REQUIRE_R1_ERROR(writer.write_sharded("/nonexistent-r1-dir/x", 0), "max_shard_bytes must be positive");
  // Nothing of the failed adds was kept.
  const TempDir dir;
  writer.write(dir / "m.safetensors");
  REQUIRE(Checkpoint::open(dir / "m.safetensors").names() == std::vector<std::string>{"w_scale_inv", "x"});
}
