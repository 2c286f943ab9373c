#include <d9d/model_state/io/source.h>

#include <torch/serialize.h>

#include <nlohmann/json.hpp>

#include <fmt/format.h>

#include "../../json_text.h"
#include "io_checks.h"

#include <filesystem>
#include <fstream>
#include <set>

namespace d9d::model_state {

namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string read_text(const std::string& path) {
  detail::check_path_text(path, path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(fmt::format("{}: cannot open", path));
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

class MemorySource final : public StateSource {
 public:
  MemorySource(StateDict tensors, std::string name) : tensors_(std::move(tensors)), name_(std::move(name)) {}
  KeySet keys() const override {
    KeySet keys;
    for (const auto& item : tensors_) keys.insert(item.first);
    return keys;
  }
  bool contains(const std::string& key) const override { return tensors_.count(key) > 0; }
  at::Tensor read(const std::string& key) const override {
    auto it = tensors_.find(key);
    if (it == tensors_.end()) throw CheckpointError(fmt::format("{}: no tensor {}", name_, detail::shown_key(key)));
    return it->second;
  }
  uint64_t nbytes(const std::string& key) const override {
    const auto t = read(key);
    // An undefined tensor (reported as a mismatch by a load) holds no bytes.
    return t.defined() ? static_cast<uint64_t>(t.numel()) * t.element_size() : 0;
  }
  std::string describe() const override { return name_; }

 private:
  StateDict tensors_;
  std::string name_;
};

/// A meta-device tensor shaped as a file's header says.
at::Tensor meta_of(const SafetensorsFile& file, const std::string& key) {
  auto it = file.header().tensors.find(key);
  if (it == file.header().tensors.end()) {
    throw CheckpointError(fmt::format("{}: no tensor '{}'", file.path(), key));
  }
  return at::empty(it->second.shape, at::TensorOptions().dtype(it->second.dtype).device(at::kMeta));
}

class SafetensorsSource final : public StateSource {
 public:
  explicit SafetensorsSource(std::shared_ptr<SafetensorsFile> file) : file_(std::move(file)) {}
  KeySet keys() const override { return file_->keys(); }
  bool contains(const std::string& key) const override { return file_->contains(key); }
  at::Tensor read(const std::string& key) const override { return file_->get(key); }
  at::Tensor read_view(const std::string& key) const override { return file_->view(key); }
  at::Tensor read_meta(const std::string& key) const override { return meta_of(*file_, key); }
  uint64_t nbytes(const std::string& key) const override { return entry(key).end - entry(key).begin; }
  void release(const std::string& key) const override { file_->release(key); }
  std::string describe() const override { return file_->path(); }

 private:
  const SafetensorsEntry& entry(const std::string& key) const {
    auto it = file_->header().tensors.find(key);
    if (it == file_->header().tensors.end()) {
      throw CheckpointError(fmt::format("{}: no tensor {}", file_->path(), detail::shown_key(key)));
    }
    return it->second;
  }
  std::shared_ptr<SafetensorsFile> file_;
};

class ShardedSource final : public StateSource {
 public:
  explicit ShardedSource(const std::string& index_path) : index_path_(index_path) {
    const SafetensorsIndex index = parse_safetensors_index(read_text(index_path), index_path);
    const fs::path dir = fs::path(index_path).parent_path();
    std::map<std::string, std::shared_ptr<SafetensorsFile>> opened;
    for (const auto& [key, shard] : index.weight_map) {
      auto it = opened.find(shard);
      if (it == opened.end()) {
        const std::string shard_path = (dir / shard).string();
        if (!detail::path_exists(shard_path, index_path)) {
          throw CheckpointError(fmt::format("{}: key {} is mapped to shard '{}', which does not exist ({})",
                                            index_path, detail::shown_key(key), shard, shard_path));
        }
        std::shared_ptr<SafetensorsFile> file;
        try {
          file = SafetensorsFile::open(shard_path);
        } catch (const CheckpointError& e) {
          // The shard's own message names the shard; this says which index sent the reader there.
          throw CheckpointError(fmt::format("{}: key {} is mapped to shard '{}', which cannot be read: {}", index_path,
                                            detail::shown_key(key), shard, e.what()));
        }
        it = opened.emplace(shard, std::move(file)).first;
      }
      if (!it->second->contains(key)) {
        throw CheckpointError(fmt::format("{}: key {} is mapped to shard '{}', which has no such tensor",
                                          index_path, detail::shown_key(key), shard));
      }
      files_.emplace(key, it->second);
    }
  }
  KeySet keys() const override {
    KeySet keys;
    for (const auto& item : files_) keys.insert(item.first);
    return keys;
  }
  bool contains(const std::string& key) const override { return files_.count(key) > 0; }
  at::Tensor read(const std::string& key) const override { return file(key).get(key); }
  at::Tensor read_view(const std::string& key) const override { return file(key).view(key); }
  at::Tensor read_meta(const std::string& key) const override { return meta_of(file(key), key); }
  uint64_t nbytes(const std::string& key) const override {
    const auto& e = file(key).header().tensors.at(key);
    return e.end - e.begin;
  }
  std::string location(const std::string& key) const override { return file(key).path(); }
  void release(const std::string& key) const override { file(key).release(key); }
  std::string describe() const override { return index_path_; }

 private:
  const SafetensorsFile& file(const std::string& key) const {
    auto it = files_.find(key);
    if (it == files_.end()) throw CheckpointError(fmt::format("{}: no tensor {} in the index", index_path_, detail::shown_key(key)));
    return *it->second;
  }
  std::string index_path_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> files_;
};

SourcePtr open_torch_save(const std::string& path) {
  const std::string bytes = read_text(path);
  c10::IValue value;
  try {
    value = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  } catch (const std::exception& e) {
    throw CheckpointError(fmt::format("{}: not a readable torch.save archive: {}", path,
                                      std::string(e.what()).substr(0, 300)));
  }
  if (!value.isGenericDict()) {
    throw CheckpointError(fmt::format("{}: expected a dict of tensors, got {}", path, value.tagKind()));
  }
  StateDict tensors;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString()) throw CheckpointError(fmt::format("{}: a key is not a string", path));
    const std::string key = item.key().toStringRef();
    if (!item.value().isTensor()) {
      throw CheckpointError(fmt::format("{}: '{}' is a {}, not a tensor (a flat state dict is expected)", path, key,
                                        item.value().tagKind()));
    }
    tensors.emplace(key, item.value().toTensor());
  }
  return std::make_shared<MemorySource>(std::move(tensors), path);
}

}  // namespace

SourcePtr state_dict_source(StateDict tensors, std::string name) {
  return std::make_shared<MemorySource>(std::move(tensors), std::move(name));
}

at::Tensor StateSource::read_meta(const std::string& key) const {
  const at::Tensor t = read(key);
  return t.defined() ? at::empty(t.sizes(), t.options().device(at::kMeta)) : t;
}

SourcePtr open_checkpoint(const std::string& path) {
  detail::check_path_text(path, "open_checkpoint");
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (status.type() == fs::file_type::not_found) {
    throw CheckpointError(fmt::format("{}: no such file or directory", path));
  }
  if (ec) throw CheckpointError(fmt::format("{}: cannot access: {}", path, ec.message()));
  if (fs::is_directory(status)) {
    const fs::path dir(path);
    if (detail::path_exists(dir / "model.safetensors.index.json", path)) {
      return std::make_shared<ShardedSource>((dir / "model.safetensors.index.json").string());
    }
    if (detail::path_exists(dir / "model.safetensors", path)) {
      return std::make_shared<SafetensorsSource>(SafetensorsFile::open((dir / "model.safetensors").string()));
    }
    throw CheckpointError(fmt::format("{}: directory holds neither model.safetensors nor "
                                      "model.safetensors.index.json",
                                      path));
  }
  if (ends_with(path, ".index.json")) return std::make_shared<ShardedSource>(path);
  if (ends_with(path, ".safetensors")) return std::make_shared<SafetensorsSource>(SafetensorsFile::open(path));
  if (ends_with(path, ".pt") || ends_with(path, ".pth") || ends_with(path, ".bin")) return open_torch_save(path);
  std::ifstream in(path, std::ios::binary);
  char magic[2] = {0, 0};
  in.read(magic, 2);
  if (magic[0] == 'P' && magic[1] == 'K') return open_torch_save(path);
  return std::make_shared<SafetensorsSource>(SafetensorsFile::open(path));
}

SafetensorsIndex parse_safetensors_index(const std::string& text, const std::string& source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("{}: not valid JSON: {}", source, e.what()));
  }
  if (!j.is_object()) throw CheckpointError(fmt::format("{}: expected a JSON object", source));
  SafetensorsIndex index;
  for (const auto& item : j.items()) {
    if (item.key() == "metadata") {
      if (!item.value().is_object()) throw CheckpointError(fmt::format("{}: metadata must be an object", source));
      auto total = item.value().find("total_size");
      if (total != item.value().end()) {
        if (!total->is_number_unsigned() && !(total->is_number_integer() && total->get<int64_t>() >= 0)) {
          throw CheckpointError(fmt::format("{}: metadata.total_size must be a non-negative integer, got {}",
                                            source, d9d::detail::quote_json(*total)));
        }
        index.total_size = total->get<uint64_t>();
      }
    } else if (item.key() != "weight_map") {
      throw CheckpointError(fmt::format("{}: unknown field {} (an index has weight_map and metadata)", source,
                                        detail::shown_key(item.key())));
    }
  }
  auto map = j.find("weight_map");
  if (map == j.end()) throw CheckpointError(fmt::format("{}: missing field 'weight_map'", source));
  if (!map->is_object()) throw CheckpointError(fmt::format("{}: weight_map must be an object", source));
  for (const auto& item : map->items()) {
    if (!item.value().is_string()) {
      throw CheckpointError(fmt::format("{}: weight_map[{}] must be a file name, got {}", source,
                                        detail::shown_key(item.key()),
                                        d9d::detail::quote_json(item.value())));
    }
    const std::string shard = item.value().get<std::string>();
    detail::check_file_name(shard, source, "weight_map[" + detail::shown_key(item.key()) + "]");
    index.weight_map.emplace(item.key(), shard);
  }
  return index;
}

std::string dump_safetensors_index(const SafetensorsIndex& index) {
  for (const auto& [key, shard] : index.weight_map) {
    detail::check_json_string(key, "safetensors index", "key");
    detail::check_file_name(shard, "safetensors index", "weight_map[" + detail::shown_key(key) + "]");
    detail::check_json_string(shard, "safetensors index", "shard file name");
  }
  nlohmann::json j;
  j["metadata"] = nlohmann::json::object();
  if (index.total_size) j["metadata"]["total_size"] = *index.total_size;
  j["weight_map"] = index.weight_map;
  return j.dump(2) + "\n";
}

}  // namespace d9d::model_state
