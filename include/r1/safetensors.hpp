// r1/safetensors.hpp: HF safetensors checkpoints, single-file or sharded, with DeepSeek-V3's
// FP8 block-scaled weights.
//
// A safetensors file (github.com/huggingface/safetensors):
//   [N: u64 LE][N bytes of JSON header, padded with spaces][data section]
//   {"__metadata__": {"format": "pt"},
//    "model.norm.weight": {"dtype": "BF16", "shape": [7168], "data_offsets": [0, 14336]}, ...}
// Offsets are [begin, end) bytes into the data section. The tensors tile it exactly, with
// no overlap, gap or trailing bytes: the reference Rust reader rejects anything else, so
// r1 accepts the files HF accepts. Every violation is an r1::error naming file and tensor.
//
// A sharded checkpoint is a directory with model-0000K-of-0000N.safetensors and
//   model.safetensors.index.json: {"metadata": {"total_size": B}, "weight_map": {name: shard}}
//
// FP8 (DeepSeek-V3's release, quantization_config {fmt e4m3, weight_block_size [128, 128]}):
//   W            F8_E4M3 [rows, cols]
//   W_scale_inv  F32 [ceil(rows/128), ceil(cols/128)], one multiplier per 128x128 block:
//   value(r, c) = e4m3(W[r, c]) * W_scale_inv[r / 128, c / 128]
//
//   SafetensorsFile    one file, validated and mapped read-only; tensor data are spans into it
//   Checkpoint         a file or an HF model directory; load() converts to float
//   SafetensorsWriter  collects tensors, writes one file or shards + index, atomically
#pragma once

#include "config.hpp"
#include "fp8.hpp"
#include "io.hpp"
#include "numeric.hpp"
#include "tensor.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace r1 {

// The safetensors dtypes. Those up to F8_E5M2 convert to float; the others are raw data.
enum class Dtype { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

namespace detail {

struct DtypeInfo {
  Dtype dtype;
  std::string_view name;  // as spelled in the header
  std::size_t size;       // bytes per element
};

inline constexpr std::array<DtypeInfo, 15> kDtypes = {{{Dtype::F64, "F64", 8},
                                                       {Dtype::F32, "F32", 4},
                                                       {Dtype::F16, "F16", 2},
                                                       {Dtype::BF16, "BF16", 2},
                                                       {Dtype::F8_E4M3, "F8_E4M3", 1},
                                                       {Dtype::F8_E5M2, "F8_E5M2", 1},
                                                       {Dtype::I64, "I64", 8},
                                                       {Dtype::I32, "I32", 4},
                                                       {Dtype::I16, "I16", 2},
                                                       {Dtype::I8, "I8", 1},
                                                       {Dtype::U64, "U64", 8},
                                                       {Dtype::U32, "U32", 4},
                                                       {Dtype::U16, "U16", 2},
                                                       {Dtype::U8, "U8", 1},
                                                       {Dtype::BOOL, "BOOL", 1}}};

inline const DtypeInfo& dtype_info(Dtype dtype) { return kDtypes[static_cast<std::size_t>(dtype)]; }

}  // namespace detail

inline std::string_view dtype_name(Dtype dtype) { return detail::dtype_info(dtype).name; }
inline std::size_t dtype_size(Dtype dtype) { return detail::dtype_info(dtype).size; }
inline bool is_float_dtype(Dtype dtype) { return dtype <= Dtype::F8_E5M2; }

// The companion that holds the block scales of an FP8 weight: "x.weight" -> "x.weight_scale_inv".
inline std::string scale_inv_name(std::string_view weight) { return std::string(weight) + "_scale_inv"; }

struct TensorInfo {
  std::string name;
  Dtype dtype;
  std::vector<int64_t> shape;
  std::size_t begin, end;  // byte offsets into the data section
};

namespace detail {

// Shapes of any rank are valid in a file; r1's tensors hold up to kMaxRank dims.
inline Shape to_shape(const TensorInfo& t, const char* op) {
  R1_CHECK(t.shape.size() <= static_cast<std::size_t>(kMaxRank), "[", op, "] tensor '", t.name, "' has rank ",
           t.shape.size(), ", r1 tensors hold at most ", kMaxRank);
  Shape s;
  for (int64_t d : t.shape) s.dims[s.rank++] = d;
  return s;
}

// Reads little-endian elements of type Bits from unaligned bytes (a file's offsets need not
// be multiples of the element size) and stores decode(bits) as float.
template <class Bits, class Decode>
void decode_elements(std::span<const std::byte> src, float* dst, Decode decode) {
  const std::size_t n = src.size() / sizeof(Bits);
  for (std::size_t i = 0; i < n; ++i) {
    Bits bits;
    std::memcpy(&bits, src.data() + i * sizeof(Bits), sizeof(Bits));
    dst[i] = decode(bits);
  }
}

// All 256 values of an FP8 format, so decoding a large weight is one lookup per element.
template <class F8>
const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int code = 0; code < 256; ++code) t[code] = F8::from_bits(static_cast<uint8_t>(code)).to_float();
    return t;
  }();
  return table;
}

inline void decode_to_float(Dtype dtype, std::span<const std::byte> src, float* dst) {
  switch (dtype) {
    case Dtype::F64: return decode_elements<double>(src, dst, [](double x) { return static_cast<float>(x); });
    case Dtype::F32: return decode_elements<float>(src, dst, [](float x) { return x; });
    case Dtype::F16: return decode_elements<uint16_t>(src, dst, [](uint16_t b) { return f16::from_bits(b).to_float(); });
    case Dtype::BF16: return decode_elements<uint16_t>(src, dst, [](uint16_t b) { return bf16::from_bits(b).to_float(); });
    case Dtype::F8_E4M3: return decode_elements<uint8_t>(src, dst, [&t = fp8_table<fp8_e4m3>()](uint8_t b) { return t[b]; });
    case Dtype::F8_E5M2: return decode_elements<uint8_t>(src, dst, [&t = fp8_table<fp8_e5m2>()](uint8_t b) { return t[b]; });
    default: R1_CHECK(false, "[safetensors] dtype ", dtype_name(dtype), " does not convert to float");
  }
}

// Metadata and tensor names go into JSON, which must be UTF-8: dropping invalid bytes
// changes a string exactly when it was not valid.
inline bool is_utf8(const std::string& s) {
  const std::string quoted = nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::ignore);
  return nlohmann::json::parse(quoted).get<std::string>() == s;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------
class SafetensorsFile {
 public:
  // The header length is capped like the Rust reader's, so a corrupt length cannot make
  // r1 parse gigabytes of tensor data as JSON.
  static constexpr uint64_t kMaxHeaderBytes = 100'000'000;

  static SafetensorsFile open(const std::filesystem::path& path) {
    SafetensorsFile f;
    f.path_ = path;
    f.file_ = detail::MappedFile::open(path, "safetensors.open");
    const std::span<const std::byte> bytes = f.file_.bytes();
    const std::string file = path.string();
    R1_CHECK(bytes.size() >= 8, "[safetensors.open] '", file, "' has ", bytes.size(),
             " bytes, too few for the 8-byte header length");
    uint64_t header_length = 0;
    std::memcpy(&header_length, bytes.data(), 8);
    R1_CHECK(header_length <= kMaxHeaderBytes, "[safetensors.open] '", file, "' declares a header of ", header_length,
             " bytes, more than the limit of ", kMaxHeaderBytes);
    R1_CHECK(header_length <= bytes.size() - 8, "[safetensors.open] '", file, "' declares a header of ", header_length,
             " bytes but has only ", bytes.size() - 8, " after the length");
    f.data_begin_ = 8 + static_cast<std::size_t>(header_length);
    const std::size_t data_size = bytes.size() - f.data_begin_;
    const char* text = reinterpret_cast<const char*>(bytes.data()) + 8;
    const nlohmann::json header = nlohmann::json::parse(text, text + header_length, nullptr, /*allow_exceptions=*/false);
    R1_CHECK(!header.is_discarded(), "[safetensors.open] '", file, "' has a header that is not valid JSON");
    R1_CHECK(header.is_object(), "[safetensors.open] '", file, "' has a header that is not a JSON object");

    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        R1_CHECK(entry.is_object(), "[safetensors.open] '", file, "': __metadata__ is not an object");
        for (const auto& [key, value] : entry.items())
          R1_CHECK(value.is_string(), "[safetensors.open] '", file, "': __metadata__ value of '", key, "' is not a string");
        f.metadata_ = entry;
        continue;
      }
      f.tensors_.push_back(parse_entry(file, name, entry, data_size));
    }

    // The tensors must tile the data section: sorted by offset, each starts where the last ended.
    std::vector<const TensorInfo*> by_offset;
    for (const TensorInfo& t : f.tensors_) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(),
              [](const TensorInfo* a, const TensorInfo* b) {
                return std::tie(a->begin, a->end, a->name) < std::tie(b->begin, b->end, b->name);  // name: deterministic messages
              });
    std::size_t covered = 0;
    const TensorInfo* previous = nullptr;
    for (const TensorInfo* t : by_offset) {
      R1_CHECK(t->begin >= covered, "[safetensors.open] '", file, "': tensor '", t->name, "' at [", t->begin, ", ", t->end,
               ") overlaps tensor '", previous->name, "', which ends at ", covered);
      R1_CHECK(t->begin == covered, "[safetensors.open] '", file, "': gap of ", t->begin - covered,
               " unused bytes before tensor '", t->name, "' at offset ", t->begin);
      covered = t->end;
      previous = t;
    }
    R1_CHECK(covered == data_size, "[safetensors.open] '", file, "': ", data_size - covered,
             " trailing bytes after the last tensor", previous ? " '" + previous->name + "'" : std::string());

    std::sort(f.tensors_.begin(), f.tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
    return f;
  }

  const std::filesystem::path& path() const { return path_; }
  // Sorted by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  const TensorInfo* find(std::string_view name) const {
    const auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                                     [](const TensorInfo& t, std::string_view n) { return t.name < n; });
    return it != tensors_.end() && it->name == name ? &*it : nullptr;
  }

  std::span<const std::byte> data(const TensorInfo& t) const {
    const std::span<const std::byte> section = file_.bytes().subspan(data_begin_);
    R1_CHECK(t.begin <= t.end && t.end <= section.size(), "[safetensors.data] tensor '", t.name, "' at [", t.begin, ", ",
             t.end, ") is outside the ", section.size(), "-byte data section of '", path_.string(), "'");
    return section.subspan(t.begin, t.end - t.begin);
  }

  // "__metadata__": string keys to string values; an empty object if the file has none.
  const nlohmann::json& metadata() const { return metadata_; }

 private:
  static TensorInfo parse_entry(const std::string& file, const std::string& name, const nlohmann::json& entry,
                                std::size_t data_size) {
    const auto where = [&] { return fmt::format("[safetensors.open] '{}': tensor '{}'", file, name); };
    R1_CHECK(entry.is_object(), where(), " is not described by an object");
    const auto field = [&](const char* key) -> const nlohmann::json& {
      const auto it = entry.find(key);
      R1_CHECK(it != entry.end(), where(), " has no \"", key, "\"");
      return *it;
    };
    const nlohmann::json& dtype = field("dtype");
    const nlohmann::json& shape = field("shape");
    const nlohmann::json& offsets = field("data_offsets");

    R1_CHECK(dtype.is_string(), where(), " has a dtype that is not a string: ", dtype.dump());
    const auto known = std::find_if(detail::kDtypes.begin(), detail::kDtypes.end(),
                                    [&](const detail::DtypeInfo& d) { return d.name == dtype.get<std::string>(); });
    R1_CHECK(known != detail::kDtypes.end(), where(), " has unknown dtype ", dtype.dump());

    TensorInfo t{name, known->dtype, {}, 0, 0};
    std::vector<uint64_t> dims;
    R1_CHECK(shape.is_array(), where(), " has a shape that is not an array: ", shape.dump());
    for (const nlohmann::json& d : shape) {
      // JSON numbers that are non-negative integers parse as unsigned.
      R1_CHECK(d.is_number_unsigned() && d.get<uint64_t>() <= uint64_t{INT64_MAX}, where(), " has a shape ",
               shape.dump(), " with an entry that is not a non-negative integer");
      dims.push_back(d.get<uint64_t>());
      t.shape.push_back(static_cast<int64_t>(dims.back()));
    }
    R1_CHECK(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() && offsets[1].is_number_unsigned(),
             where(), " has data_offsets ", offsets.dump(), ", not two non-negative integers");
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    R1_CHECK(begin <= end, where(), " has data_offsets ", offsets.dump(), " that end before they begin");
    R1_CHECK(end <= data_size, where(), " has data_offsets ", offsets.dump(), " past the end of the ", data_size,
             "-byte data section");
    const std::optional<uint64_t> numel = detail::product_up_to(dims, data_size);
    R1_CHECK(numel && *numel * known->size == end - begin, where(), " with dtype ", known->name, " and shape ",
             shape.dump(), " needs ", numel ? fmt::format("{}", *numel * known->size) : std::string("more"),
             " bytes, its data_offsets ", offsets.dump(), " hold ", end - begin);
    t.begin = static_cast<std::size_t>(begin);
    t.end = static_cast<std::size_t>(end);
    return t;
  }

  std::filesystem::path path_;
  detail::MappedFile file_;
  std::size_t data_begin_ = 0;
  std::vector<TensorInfo> tensors_;
  nlohmann::json metadata_ = nlohmann::json::object();
};

// ---------------------------------------------------------------------------------------
struct CheckpointOptions {
  // Off: load() refuses FP8 weights that have block scales, so they can only be read, still
  // quantized, through load_fp8().
  bool dequantize_fp8 = true;
};

class Checkpoint {
 public:
  using Options = CheckpointOptions;

  struct Fp8Weight {
    Tensor<fp8_e4m3> codes;   // [rows, cols]
    Tensor<float> scale_inv;  // [ceil(rows/128), ceil(cols/128)]
  };

  // path: a .safetensors file, or a directory with model.safetensors.index.json (preferred)
  // or model.safetensors.
  static Checkpoint open(const std::filesystem::path& path, Options options = {}) {
    Checkpoint c;
    c.path_ = path;
    c.options_ = options;
    // error_code overloads: a file system error is reported as r1::error like the rest.
    std::error_code ec;
    const std::filesystem::file_status status = std::filesystem::status(path, ec);
    R1_CHECK(std::filesystem::exists(status), "[checkpoint.open] '", path.string(), "' does not exist");
    if (!std::filesystem::is_directory(status)) {
      c.add_file(path);
    } else if (const std::filesystem::path index = path / "model.safetensors.index.json"; std::filesystem::exists(index, ec)) {
      c.open_index(index);
    } else {
      const std::filesystem::path single = path / "model.safetensors";
      R1_CHECK(std::filesystem::exists(single, ec), "[checkpoint.open] directory '", path.string(),
               "' has neither model.safetensors.index.json nor model.safetensors");
      c.add_file(single);
    }
    return c;
  }

  const std::filesystem::path& path() const { return path_; }
  const Options& options() const { return options_; }

  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  const TensorInfo& info(std::string_view name) const { return locate(name, "checkpoint.info").second; }

  // The file that holds a tensor: for its raw data() or its shard's metadata().
  const SafetensorsFile& file_of(std::string_view name) const { return locate(name, "checkpoint.file_of").first; }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& entry : index_) out.push_back(entry.first);
    return out;  // index_ is a sorted map
  }

  // Converts a float tensor (F64/F32/F16/BF16/F8) into out, resized to the stored shape, or
  // checked against expected when given. An F8_E4M3 weight with a NAME_scale_inv companion
  // is dequantized: each 128x128 block is multiplied by its scale.
  void load(std::string_view name, Tensor<float>& out, const std::optional<Shape>& expected = std::nullopt) const {
    const auto& [file, t] = locate(name, "checkpoint.load");
    R1_CHECK(is_float_dtype(t.dtype), "[checkpoint.load] tensor '", name, "' in '", file.path().string(), "' has dtype ",
             dtype_name(t.dtype), ", which does not convert to float");
    const Shape shape = detail::to_shape(t, "checkpoint.load");
    R1_CHECK(!expected || *expected == shape, "[checkpoint.load] tensor '", name, "' in '", file.path().string(),
             "' has shape ", shape, ", expected ", expected.value_or(Shape{}));
    const std::string scale_name = scale_inv_name(name);
    const bool block_scaled = t.dtype == Dtype::F8_E4M3 && contains(scale_name);
    R1_CHECK(!block_scaled || options_.dequantize_fp8, "[checkpoint.load] tensor '", name,
             "' is an FP8 weight with block scales and dequantize_fp8 is off: read it with load_fp8");
    Tensor<float> scale_inv;
    if (block_scaled) scale_inv = load_scales(name, shape);
    out.resize(shape);
    detail::decode_to_float(t.dtype, file.data(t), out.data());
    if (block_scaled) {
      const int64_t rows = shape[0], cols = shape[1];
      for (int64_t r = 0; r < rows; ++r) {
        const float* scale_row = scale_inv.data() + (r / kFp8BlockSize) * scale_inv.size(1);
        float* row = out.data() + r * cols;
        for (int64_t c = 0; c < cols; ++c) row[c] *= scale_row[c / kFp8BlockSize];
      }
    }
  }

  // An FP8 weight as stored: e4m3 codes and its block scales, which must exist.
  Fp8Weight load_fp8(std::string_view name) const {
    const auto& [file, t] = locate(name, "checkpoint.load_fp8");
    R1_CHECK(t.dtype == Dtype::F8_E4M3, "[checkpoint.load_fp8] tensor '", name, "' in '", file.path().string(),
             "' has dtype ", dtype_name(t.dtype), ", not F8_E4M3");
    R1_CHECK(contains(scale_inv_name(name)), "[checkpoint.load_fp8] FP8 tensor '", name, "' has no '",
             scale_inv_name(name), "' with its block scales");
    const Shape shape = detail::to_shape(t, "checkpoint.load_fp8");
    Fp8Weight w;
    w.scale_inv = load_scales(name, shape);
    static_assert(sizeof(fp8_e4m3) == 1 && std::is_trivially_copyable_v<fp8_e4m3>, "codes are copied as bytes");
    w.codes.resize(shape);
    const std::span<const std::byte> bytes = file.data(t);
    if (!bytes.empty()) std::memcpy(w.codes.data(), bytes.data(), bytes.size());
    return w;
  }

  // Throws unless the checkpoint holds exactly the expected tensors. The NAME_scale_inv
  // companion of an expected FP8 weight counts as expected.
  void check_names(const std::vector<std::string>& expected) const {
    const std::set<std::string_view> wanted(expected.begin(), expected.end());
    std::vector<std::string_view> missing, unexpected;
    for (const std::string& name : expected)
      if (!contains(name)) missing.push_back(name);
    constexpr std::string_view suffix = "_scale_inv";
    for (const auto& [name, location] : index_) {
      if (wanted.count(name)) continue;
      const std::string_view name_view = name;
      const bool companion = name_view.ends_with(suffix) &&
                             wanted.count(name_view.substr(0, name_view.size() - suffix.size())) &&
                             info(name_view.substr(0, name_view.size() - suffix.size())).dtype == Dtype::F8_E4M3;
      if (!companion) unexpected.push_back(name);
    }
    const auto describe = [](const std::vector<std::string_view>& names, const char* what) {
      return names.empty() ? fmt::format("0 {}", what) : fmt::format("{} {} (first: '{}')", names.size(), what, names[0]);
    };
    R1_CHECK(missing.empty() && unexpected.empty(), "[checkpoint.check_names] '", path_.string(), "': ",
             describe(missing, "missing"), ", ", describe(unexpected, "unexpected"), " tensors");
  }

 private:
  struct Location {
    std::size_t file, tensor;  // indices into files_ and that file's tensors()
  };

  std::pair<const SafetensorsFile&, const TensorInfo&> locate(std::string_view name, const char* op) const {
    const auto it = index_.find(name);
    R1_CHECK(it != index_.end(), "[", op, "] no tensor '", name, "' in checkpoint '", path_.string(), "'");
    const SafetensorsFile& file = files_[it->second.file];
    return {file, file.tensors()[it->second.tensor]};
  }

  // The block scales of FP8 weight name, whose shape they are checked against.
  Tensor<float> load_scales(std::string_view name, const Shape& weight) const {
    R1_CHECK(weight.rank == 2, "[checkpoint.load] FP8 weight '", name, "' has shape ", weight,
             "; block scales need a 2-D weight");
    Tensor<float> scale;
    load(scale_inv_name(name), scale, fp8_scale_shape(weight));
    return scale;
  }

  void add_file(const std::filesystem::path& path) {
    files_.push_back(SafetensorsFile::open(path));
    const std::vector<TensorInfo>& tensors = files_.back().tensors();
    for (std::size_t i = 0; i < tensors.size(); ++i) index_.emplace(tensors[i].name, Location{files_.size() - 1, i});
  }

  void open_index(const std::filesystem::path& index_path) {
    const std::string where = "[checkpoint.open] '" + index_path.string() + "'";
    const detail::MappedFile text = detail::MappedFile::open(index_path, "checkpoint.open");
    const char* begin = reinterpret_cast<const char*>(text.bytes().data());
    const nlohmann::json index = nlohmann::json::parse(begin, begin + text.bytes().size(), nullptr, false);
    R1_CHECK(!index.is_discarded(), where, " is not valid JSON");
    R1_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(), where,
             " has no \"weight_map\" object");
    const std::filesystem::path dir = index_path.parent_path();
    std::map<std::string, std::size_t> shard_files;  // shard name -> index into files_
    for (const auto& [name, shard] : index["weight_map"].items()) {
      R1_CHECK(shard.is_string(), where, " maps tensor '", name, "' to ", shard.dump(), ", not a file name");
      const std::string shard_name = shard.get<std::string>();
      auto it = shard_files.find(shard_name);
      if (it == shard_files.end()) {
        std::error_code ec;
        R1_CHECK(std::filesystem::is_regular_file(dir / shard_name, ec), where, " maps tensor '", name, "' to '", shard_name,
                 "', which does not exist");
        files_.push_back(SafetensorsFile::open(dir / shard_name));
        it = shard_files.emplace(shard_name, files_.size() - 1).first;
      }
      const SafetensorsFile& file = files_[it->second];
      const TensorInfo* t = file.find(name);
      R1_CHECK(t != nullptr, where, " maps tensor '", name, "' to '", shard_name, "', which does not contain it");
      index_.emplace(name, Location{it->second, static_cast<std::size_t>(t - file.tensors().data())});
    }
    // Every tensor of every shard is listed, and for that shard: otherwise the index and the
    // shards disagree about what the checkpoint holds.
    for (std::size_t f = 0; f < files_.size(); ++f) {
      const std::string shard_name = files_[f].path().filename().string();
      for (const TensorInfo& t : files_[f].tensors()) {
        const auto it = index_.find(t.name);
        R1_CHECK(it != index_.end(), where, " does not list tensor '", t.name, "' of shard '", shard_name, "'");
        R1_CHECK(it->second.file == f, where, " maps tensor '", t.name, "' to '",
                 files_[it->second.file].path().filename().string(), "', but shard '", shard_name, "' holds it too");
      }
    }
  }

  std::filesystem::path path_;
  Options options_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, Location, std::less<>> index_;  // sorted: names() relies on it
};

// ---------------------------------------------------------------------------------------
class SafetensorsWriter {
 public:
  // transformers refuses a safetensors archive whose metadata has no "format" entry.
  SafetensorsWriter() { metadata_["format"] = "pt"; }

  // Stores values converted to stored_as (F32, F16 or BF16; rounding to nearest even).
  void add(std::string name, ConstView<float> values, Dtype stored_as = Dtype::F32) {
    R1_CHECK(stored_as == Dtype::F32 || stored_as == Dtype::F16 || stored_as == Dtype::BF16, "[safetensors.add] tensor '",
             name, "': cannot store as ", dtype_name(stored_as), " (F32, F16 or BF16; FP8 through add_fp8_block_scaled)");
    check_new(name, "safetensors.add");
    const Tensor<float> contiguous = to_tensor(values);
    std::vector<std::byte> bytes(static_cast<std::size_t>(contiguous.numel()) * dtype_size(stored_as));
    const auto encode = [&](auto to_bits) {
      for (int64_t i = 0; i < contiguous.numel(); ++i) {
        const auto bits = to_bits(contiguous.data()[i]);
        std::memcpy(bytes.data() + i * sizeof(bits), &bits, sizeof(bits));
      }
    };
    if (stored_as == Dtype::F32) encode([](float x) { return x; });
    if (stored_as == Dtype::F16) encode([](float x) { return f16::from_float(x).bits; });
    if (stored_as == Dtype::BF16) encode([](float x) { return bf16::from_float(x).bits; });
    entries_.emplace(std::move(name), Entry{stored_as, values.shape(), std::move(bytes)});
  }

  // Quantizes a 2-D weight as DeepGEMM's per_block_cast_to_fp8 does for DeepSeek-V3: per
  // 128x128 block, amax = max(max |x|, 1e-4), code = e4m3(x * (448 / amax)), and the block's
  // scale_inv = amax / 448 multiplies the codes back on load. Writes name (F8_E4M3) and
  // name_scale_inv (F32).
  void add_fp8_block_scaled(std::string name, ConstView<float> weight) {
    R1_CHECK(weight.rank() == 2, "[safetensors.add_fp8_block_scaled] tensor '", name, "' has shape ", weight.shape(),
             ", block scaling needs a 2-D weight");
    check_new(name, "safetensors.add_fp8_block_scaled");
    check_new(scale_inv_name(name), "safetensors.add_fp8_block_scaled");
    const int64_t cols = weight.size(1);
    const Tensor<float> contiguous = to_tensor(weight);
    for (int64_t i = 0; i < contiguous.numel(); ++i)
      R1_CHECK(std::isfinite(contiguous.data()[i]), "[safetensors.add_fp8_block_scaled] tensor '", name, "' has ",
               contiguous.data()[i], " at (", i / cols, ", ", i % cols, ")");
    Tensor<fp8_e4m3> quantized(weight.shape());
    Tensor<float> scale_inv(fp8_scale_shape(weight.shape()));
    quantize_fp8_blocks(contiguous, quantized.view(), scale_inv.view());
    static_assert(sizeof(fp8_e4m3) == 1 && std::is_trivially_copyable_v<fp8_e4m3>, "codes are copied as bytes");
    std::vector<std::byte> codes(quantized.bytes());
    if (!codes.empty()) std::memcpy(codes.data(), quantized.data(), codes.size());
    entries_.emplace(name, Entry{Dtype::F8_E4M3, weight.shape(), std::move(codes)});
    add(scale_inv_name(name), scale_inv);
  }

  void set_metadata(std::string key, std::string value) {
    R1_CHECK(detail::is_utf8(key) && detail::is_utf8(value), "[safetensors.set_metadata] key '", key,
             "' or its value is not valid UTF-8");
    metadata_[std::move(key)] = std::move(value);
  }

  // One file with every tensor.
  void write(const std::filesystem::path& file) const {
    std::vector<EntryRef> all;
    for (const auto& [name, entry] : entries_) all.push_back(EntryRef{&name, &entry});
    write_file(file, all);
  }

  // model-0000K-of-0000N.safetensors shards of at most max_shard_bytes of tensor data (a
  // larger tensor gets a shard of its own), filled in name order, then the index. The
  // index is written last, so a reader sees the new shards only once all are in place.
  void write_sharded(const std::filesystem::path& dir, std::size_t max_shard_bytes) const {
    R1_CHECK(max_shard_bytes > 0, "[safetensors.write_sharded] max_shard_bytes must be positive");
    std::vector<std::vector<EntryRef>> shards;
    std::size_t shard_bytes = 0;
    for (const auto& [name, entry] : entries_) {
      if (shards.empty() || (shard_bytes > 0 && shard_bytes + entry.bytes.size() > max_shard_bytes)) {
        shards.emplace_back();
        shard_bytes = 0;
      }
      shards.back().push_back(EntryRef{&name, &entry});
      shard_bytes += entry.bytes.size();
    }
    if (shards.empty()) shards.emplace_back();  // a checkpoint with no tensors is still one shard
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    R1_CHECK(!ec, "[safetensors.write_sharded] cannot create directory '", dir.string(), "': ", ec.message());
    nlohmann::json weight_map = nlohmann::json::object();
    std::size_t total_size = 0;
    for (std::size_t k = 0; k < shards.size(); ++k) {
      const std::string shard_name = fmt::format("model-{:05d}-of-{:05d}.safetensors", k + 1, shards.size());
      write_file(dir / shard_name, shards[k]);
      for (const EntryRef& e : shards[k]) {
        weight_map[*e.name] = shard_name;
        total_size += e.entry->bytes.size();
      }
    }
    const nlohmann::json index = {{"metadata", {{"total_size", total_size}}}, {"weight_map", weight_map}};
    write_file_atomic(dir / "model.safetensors.index.json", [&](std::ostream& out) { out << index.dump(2) << '\n'; });
  }

 private:
  struct Entry {
    Dtype dtype;
    Shape shape;
    std::vector<std::byte> bytes;  // little-endian elements
  };
  struct EntryRef {
    const std::string* name;
    const Entry* entry;
  };

  void check_new(const std::string& name, const char* op) const {
    R1_CHECK(!name.empty(), "[", op, "] empty tensor name");
    R1_CHECK(name != "__metadata__", "[", op, "] '__metadata__' is reserved for the metadata");
    R1_CHECK(detail::is_utf8(name), "[", op, "] tensor name '", name, "' is not valid UTF-8");
    R1_CHECK(!entries_.count(name), "[", op, "] tensor '", name, "' was already added");
  }

  void write_file(const std::filesystem::path& path, std::vector<EntryRef> entries) const {
    // Wider elements first, then by name, as HF's writer orders them: with the data section
    // starting 8-aligned, every tensor then starts at a multiple of its element size.
    std::sort(entries.begin(), entries.end(), [](const EntryRef& a, const EntryRef& b) {
      const std::size_t sa = dtype_size(a.entry->dtype), sb = dtype_size(b.entry->dtype);
      return sa != sb ? sa > sb : *a.name < *b.name;
    });
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    header["__metadata__"] = metadata_;
    std::size_t offset = 0;
    for (const EntryRef& e : entries) {
      const Shape& s = e.entry->shape;
      header[*e.name] = {{"dtype", std::string(dtype_name(e.entry->dtype))},
                         {"shape", std::vector<int64_t>(s.dims.begin(), s.dims.begin() + s.rank)},
                         {"data_offsets", {offset, offset + e.entry->bytes.size()}}};
      offset += e.entry->bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // pads the header so the data start 8-aligned
    write_file_atomic(path, [&](std::ostream& out) {
      const uint64_t length = text.size();
      out.write(reinterpret_cast<const char*>(&length), 8);
      out.write(text.data(), static_cast<std::streamsize>(text.size()));
      for (const EntryRef& e : entries)
        out.write(reinterpret_cast<const char*>(e.entry->bytes.data()), static_cast<std::streamsize>(e.entry->bytes.size()));
    });
  }

  std::map<std::string, Entry> entries_;  // by name
  std::map<std::string, std::string> metadata_;
};

}  // namespace r1
