// r1/io.hpp: crash-safe file writes, read-only file mappings and float32 .npy files.
//
//   write_file_atomic  the callback writes into a temporary file next to the target; it is
//                      fsync'ed, renamed over the target and the directory is fsync'ed. A
//                      reader, or a crash at any point, sees the old file or the complete
//                      new one, never a torn one. On failure the temporary file is removed.
//   .npy (v1.0)        "\x93NUMPY", version 1 0, a u16 LE header length, then a Python dict
//                      literal {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
//                      padded with spaces and a '\n' so the data starts at a multiple of
//                      64 bytes (as numpy writes it), then the elements in C order.
//
// POSIX only (open/fsync/rename/mmap). Files are little-endian, as the host must be.
#pragma once

#include "config.hpp"
#include "tensor.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <charconv>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <ostream>
#include <span>
#include <streambuf>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace r1 {

static_assert(std::endian::native == std::endian::little,
              "r1/io.hpp: safetensors and .npy files are little-endian and are read in place");

namespace detail {

// A whole file mapped read-only; move-only, unmapped on destruction. An empty file maps
// to an empty span (mmap rejects length 0).
class MappedFile {
 public:
  MappedFile() = default;
  MappedFile(MappedFile&& other) noexcept { *this = std::move(other); }
  MappedFile& operator=(MappedFile&& other) noexcept {
    if (this != &other) {
      unmap();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { unmap(); }

  // op prefixes the error messages ("safetensors.open", "read_npy").
  static MappedFile open(const std::filesystem::path& path, const char* op) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    R1_CHECK(fd >= 0, "[", op, "] cannot open '", path.string(), "': ", std::strerror(errno));
    struct stat st {};
    const bool stat_ok = ::fstat(fd, &st) == 0;
    const int stat_errno = errno;
    MappedFile file;
    if (stat_ok && S_ISREG(st.st_mode) && st.st_size > 0) {
      void* p = ::mmap(nullptr, static_cast<std::size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
      if (p != MAP_FAILED) {
        file.data_ = static_cast<const std::byte*>(p);
        file.size_ = static_cast<std::size_t>(st.st_size);
      }
    }
    const int map_errno = errno;
    ::close(fd);  // the mapping stays valid without the descriptor
    R1_CHECK(stat_ok, "[", op, "] cannot stat '", path.string(), "': ", std::strerror(stat_errno));
    R1_CHECK(S_ISREG(st.st_mode), "[", op, "] '", path.string(), "' is not a regular file");
    R1_CHECK(st.st_size == 0 || file.data_ != nullptr, "[", op, "] cannot map '", path.string(),
             "': ", std::strerror(map_errno));
    return file;
  }

  std::span<const std::byte> bytes() const { return {data_, size_}; }

 private:
  void unmap() {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }

  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// An ostream buffer over a file descriptor that keeps the errno of the first failed write,
// so the caller can report why (a full disk, a quota) instead of just "the stream failed".
class FdStreamBuf : public std::streambuf {
 public:
  explicit FdStreamBuf(int fd) : fd_(fd), buffer_(std::size_t{1} << 20) {
    setp(buffer_.data(), buffer_.data() + buffer_.size());
  }
  int error() const { return error_; }

 protected:
  int_type overflow(int_type ch) override {
    if (!drain()) return traits_type::eof();
    if (!traits_type::eq_int_type(ch, traits_type::eof())) {
      *pptr() = traits_type::to_char_type(ch);
      pbump(1);
    }
    return traits_type::not_eof(ch);
  }
  int sync() override { return drain() ? 0 : -1; }

 private:
  bool drain() {
    const char* p = pbase();
    std::size_t left = static_cast<std::size_t>(pptr() - pbase());
    while (left > 0 && error_ == 0) {
      const ssize_t n = ::write(fd_, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        error_ = errno;
        break;
      }
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    setp(buffer_.data(), buffer_.data() + buffer_.size());
    return error_ == 0;
  }

  int fd_;
  std::vector<char> buffer_;
  int error_ = 0;
};

// Removes the temporary file (closing it first) unless the rename went through; this is
// what keeps a failed or interrupted write from leaving debris next to the target.
struct TempFile {
  std::filesystem::path path;
  int fd = -1;
  bool renamed = false;
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!renamed) ::unlink(path.c_str());
  }
};

}  // namespace detail

// Writes path through a temporary file in the same directory (rename is atomic only
// within a file system). If write throws, its exception propagates after the temporary
// file is removed; I/O failures throw r1::error. Either way the old file is untouched.
inline void write_file_atomic(const std::filesystem::path& path, const std::function<void(std::ostream&)>& write) {
  R1_CHECK(path.has_filename(), "[write_file_atomic] '", path.string(), "' names no file");
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  // pid + counter makes the name unique among writers; O_EXCL guarantees it against leftovers.
  static std::atomic<uint64_t> counter{0};
  detail::TempFile temp;
  for (int attempt = 0;; ++attempt) {
    temp.path = dir / fmt::format(".{}.tmp.{}.{}", path.filename().string(), ::getpid(), counter++);
    temp.fd = ::open(temp.path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (temp.fd >= 0) break;
    R1_CHECK(errno == EEXIST && attempt < 100, "[write_file_atomic] cannot create '", temp.path.string(),
             "': ", std::strerror(errno));
  }
  detail::FdStreamBuf buffer(temp.fd);
  std::ostream out(&buffer);
  write(out);
  out.flush();
  R1_CHECK(buffer.error() == 0, "[write_file_atomic] writing '", temp.path.string(), "' failed: ",
           std::strerror(buffer.error()));
  R1_CHECK(out.good(), "[write_file_atomic] the stream for '", temp.path.string(), "' is in a failed state");
  R1_CHECK(::fsync(temp.fd) == 0, "[write_file_atomic] fsync of '", temp.path.string(), "' failed: ", std::strerror(errno));
  // close() can report a deferred write error (NFS), so it is checked, not left to ~TempFile.
  const int close_result = ::close(std::exchange(temp.fd, -1));
  R1_CHECK(close_result == 0, "[write_file_atomic] closing '", temp.path.string(), "' failed: ", std::strerror(errno));
  R1_CHECK(::rename(temp.path.c_str(), path.c_str()) == 0, "[write_file_atomic] cannot rename '", temp.path.string(),
           "' to '", path.string(), "': ", std::strerror(errno));
  temp.renamed = true;
  // The rename itself is durable only once the directory entry is on disk.
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  R1_CHECK(dir_fd >= 0, "[write_file_atomic] cannot open directory '", dir.string(), "': ", std::strerror(errno));
  const int sync_result = ::fsync(dir_fd);
  const int sync_errno = errno;
  ::close(dir_fd);
  R1_CHECK(sync_result == 0, "[write_file_atomic] fsync of directory '", dir.string(), "' failed: ", std::strerror(sync_errno));
}

// ---------------------------------------------------------------------------------------
// .npy: float32, C order. numpy.load reads what write_npy writes and vice versa.

inline void write_npy(const std::filesystem::path& path, ConstView<float> values) {
  std::vector<int64_t> dims(values.shape().dims.begin(), values.shape().dims.begin() + values.rank());
  // Python's tuple syntax: (2, 3), but (5,) for one element and () for none.
  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}{}), }}", fmt::join(dims, ", "),
                                   dims.size() == 1 ? "," : "");
  constexpr std::size_t preamble = 10;  // magic (6) + version (2) + header length (2)
  // At most kMaxRank dims keep this far below version 1.0's 65535-byte limit.
  const std::size_t padded = (preamble + header.size() + 1 + 63) / 64 * 64 - preamble;  // + 1 for the '\n'
  header.append(padded - header.size() - 1, ' ');
  header += '\n';
  const Tensor<float> gathered = values.is_contiguous() ? Tensor<float>() : to_tensor(values);
  const float* data = values.is_contiguous() ? values.data() : gathered.data();
  write_file_atomic(path, [&](std::ostream& out) {
    const uint16_t header_length = static_cast<uint16_t>(padded);
    out.write("\x93NUMPY\x01\x00", 8);
    out.write(reinterpret_cast<const char*>(&header_length), 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(values.numel() * sizeof(float)));
  });
}

namespace detail {

// The product of dims, or nullopt when it exceeds limit. Dividing instead of multiplying
// keeps sizes read from an untrusted file from overflowing.
inline std::optional<uint64_t> product_up_to(std::span<const uint64_t> dims, uint64_t limit) {
  if (std::find(dims.begin(), dims.end(), uint64_t{0}) != dims.end()) return 0;
  uint64_t n = 1;
  for (uint64_t d : dims) {
    if (d > limit / n) return std::nullopt;
    n *= d;
  }
  return n;
}

// The value after 'key': in a .npy header dict, with leading spaces skipped; empty if absent.
inline std::string_view npy_field(std::string_view header, std::string_view key) {
  const std::string quoted = "'" + std::string(key) + "':";
  const std::size_t at = header.find(quoted);
  if (at == std::string_view::npos) return {};
  std::string_view rest = header.substr(at + quoted.size());
  while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
  return rest;
}

}  // namespace detail

inline Tensor<float> read_npy(const std::filesystem::path& path) {
  const detail::MappedFile file = detail::MappedFile::open(path, "read_npy");
  const std::span<const std::byte> bytes = file.bytes();
  const std::string name = path.string();
  const auto u8 = [&](std::size_t i) { return std::to_integer<uint32_t>(bytes[i]); };
  R1_CHECK(bytes.size() >= 10 && std::memcmp(bytes.data(), "\x93NUMPY", 6) == 0, "[read_npy] '", name,
           "' is not a .npy file (no \\x93NUMPY magic)");
  const uint32_t major = u8(6);
  R1_CHECK(major >= 1 && major <= 3, "[read_npy] '", name, "' has unknown .npy version ", major, ".", u8(7));
  // Versions 2 and 3 widen the header length to u32 (3 only changes the text encoding).
  const std::size_t length_bytes = major == 1 ? 2 : 4;
  R1_CHECK(bytes.size() >= 8 + length_bytes, "[read_npy] '", name, "' is truncated inside its preamble");
  std::size_t header_length = 0;
  for (std::size_t i = 0; i < length_bytes; ++i) header_length |= static_cast<std::size_t>(u8(8 + i)) << (8 * i);
  const std::size_t data_begin = 8 + length_bytes + header_length;
  R1_CHECK(data_begin <= bytes.size(), "[read_npy] '", name, "' header length ", header_length, " runs past the end of the file");
  const std::string_view header(reinterpret_cast<const char*>(bytes.data()) + 8 + length_bytes, header_length);

  const std::string_view descr = detail::npy_field(header, "descr");
  R1_CHECK(descr.starts_with("'<f4'"), "[read_npy] '", name, "' is not little-endian float32: header ", header);
  R1_CHECK(detail::npy_field(header, "fortran_order").starts_with("False"), "[read_npy] '", name,
           "' is not in C order: header ", header);
  std::string_view dims = detail::npy_field(header, "shape");
  R1_CHECK(dims.starts_with("(") && dims.find(')') != std::string_view::npos, "[read_npy] '", name,
           "' has no shape tuple: header ", header);
  dims = dims.substr(1, dims.find(')') - 1);
  Shape shape;
  while (!dims.empty()) {
    while (!dims.empty() && (dims.front() == ' ' || dims.front() == ',')) dims.remove_prefix(1);
    if (dims.empty()) break;
    int64_t d = -1;
    const auto [end, ec] = std::from_chars(dims.data(), dims.data() + dims.size(), d);
    dims.remove_prefix(static_cast<std::size_t>(end - dims.data()));
    R1_CHECK(ec == std::errc() && d >= 0 && (dims.empty() || dims.front() == ',' || dims.front() == ' '),
             "[read_npy] '", name, "' has a malformed shape: header ", header);
    R1_CHECK(shape.rank < kMaxRank, "[read_npy] '", name, "' has more than ", kMaxRank, " dims: header ", header);
    shape.dims[shape.rank++] = d;
  }
  const std::size_t data_bytes = bytes.size() - data_begin;
  const std::vector<uint64_t> sizes(shape.dims.begin(), shape.dims.begin() + shape.rank);
  const std::optional<uint64_t> numel = detail::product_up_to(sizes, data_bytes / sizeof(float));
  R1_CHECK(numel && *numel * sizeof(float) == data_bytes, "[read_npy] '", name, "' has ", data_bytes,
           " data bytes, not the 4 per element that shape ", shape, " needs");
  Tensor<float> out;
  out.resize(shape);
  if (data_bytes) std::memcpy(out.data(), bytes.data() + data_begin, data_bytes);
  return out;
}

}  // namespace r1
