// What the LoRA wrappers share: adapter bookkeeping and the key layout.
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/embedding.h>
#include <d9d/peft/lora/linear.h>

#include <torch/nn/modules/container/moduledict.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace d9d::peft {

namespace {

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

template <typename Adapter>
std::vector<std::string> LoRALayer<Adapter>::adapter_names() const {
  std::vector<std::string> out;
  for (const auto& e : entries_) out.push_back(e.first);
  return out;
}

template <typename Adapter>
std::shared_ptr<Adapter> LoRALayer<Adapter>::find(const std::string& name) const {
  for (const auto& e : entries_) {
    if (e.first == name) return e.second;
  }
  return nullptr;
}

template <typename Adapter>
Adapter& LoRALayer<Adapter>::adapter(const std::string& name) const {
  if (auto a = find(name)) return *a;
  const auto held = adapter_names();
  throw PeftError(fmt::format("this LoRA layer has no adapter \"{}\"; it holds {}", name,
                              held.empty() ? std::string("none")
                                           : "\"" + fmt::format("{}", fmt::join(held, "\", \"")) + "\""));
}

template <typename Adapter>
Adapter& LoRALayer<Adapter>::pick(const std::string& name) const {
  if (!name.empty()) return adapter(name);
  if (entries_.empty()) throw PeftError("this LoRA layer holds no adapter (the last one was deleted)");
  return *entries_.front().second;
}

template <typename Adapter>
std::string LoRALayer<Adapter>::key_prefix(const std::string& name) const {
  adapter(name);  // throws if absent
  return !entries_.empty() && entries_.front().first == name ? std::string() : "adapters." + name + ".";
}

template <typename Adapter>
void LoRALayer<Adapter>::set_active_adapters(const std::vector<std::string>& names) {
  active_.clear();
  for (const auto& [name, adapter] : entries_) {
    const bool on = contains(names, name);
    if (on) active_.push_back(name);
    for (auto& p : adapter->parameters()) p.requires_grad_(on);
  }
}

template <typename Adapter>
void LoRALayer<Adapter>::append(const std::string& name, std::shared_ptr<Adapter> adapter) {
  validate_adapter_name(name);
  if (find(name)) throw PeftError(fmt::format("this LoRA layer already holds an adapter \"{}\"", name));
  for (auto& p : adapter->parameters()) p.requires_grad_(false);
  entries_.emplace_back(name, std::move(adapter));
  relayout();
}

template <typename Adapter>
void LoRALayer<Adapter>::delete_adapter(const std::string& name) {
  adapter(name);  // throws if absent
  entries_.erase(std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.first == name; }));
  active_.erase(std::remove(active_.begin(), active_.end(), name), active_.end());
  merged_.erase(std::remove(merged_.begin(), merged_.end(), name), merged_.end());
  relayout();
}

template <typename Adapter>
Adapter& LoRALayer<Adapter>::require_merged(const std::string& name, bool merged, const char* what) const {
  Adapter& a = adapter(name);
  if (is_merged(name) != merged) {
    throw PeftError(fmt::format("{}: adapter \"{}\" is {} merged", what, name, merged ? "not" : "already"));
  }
  return a;
}

template <typename Adapter>
bool LoRALayer<Adapter>::is_merged(const std::string& name) const {
  return contains(merged_, name);
}

template <typename Adapter>
void LoRALayer<Adapter>::set_merged(const std::string& name, bool merged) {
  merged_.erase(std::remove(merged_.begin(), merged_.end(), name), merged_.end());
  if (merged) merged_.push_back(name);
}

template <typename Adapter>
std::vector<std::string> LoRALayer<Adapter>::fresh_state_keys() const {
  std::vector<std::string> keys;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const std::string prefix = i == 0 ? "" : "adapters." + entries_[i].first + ".";
    for (const auto& p : entries_[i].second->named_parameters()) keys.push_back(prefix + p.key());
  }
  return keys;
}

template <typename Adapter>
void LoRALayer<Adapter>::after_base_loaded(const model_state::KeySet& loaded_adapter_keys) {
  // DoRA's magnitude is the norm of the base weight with the delta added: it
  // follows newly loaded base weights unless it was loaded itself.
  for (auto& [name, a] : entries_) {
    if (!a->options().use_dora() || is_merged(name)) continue;
    if (loaded_adapter_keys.count(key_prefix(name) + "lora_magnitude_vector")) continue;
    reset_adapter_magnitude(*a);
  }
}

template <typename Adapter>
void LoRALayer<Adapter>::reset_parameters() {
  for (auto& e : entries_) reset_adapter(*e.second);
}

template <typename Adapter>
void LoRALayer<Adapter>::reset_magnitude(const std::string& name) {
  Adapter& a = pick(name);
  if (!a.options().use_dora()) throw PeftError("reset_magnitude: this LoRA adapter does not use DoRA");
  reset_adapter_magnitude(a);
}

template <typename Adapter>
std::shared_ptr<torch::nn::Module> LoRALayer<Adapter>::further_adapters() const {
  if (entries_.size() < 2) return nullptr;
  torch::nn::ModuleDict more;
  for (size_t i = 1; i < entries_.size(); ++i) {
    more->update(std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{
        {entries_[i].first, entries_[i].second}});
  }
  return more.ptr();
}

template <typename Adapter>
void LoRALayer<Adapter>::print_adapters(std::ostream& stream, const char* type) const {
  stream << type << "(";
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& o = entries_[i].second->options();
    const auto& name = entries_[i].first;
    if (i) stream << "; ";
    if (entries_.size() > 1 || name != kDefaultAdapterName) {
      stream << name << (contains(active_, name) ? "*" : "") << ": ";
    }
    stream << "r=" << o.r() << ", alpha=" << o.alpha() << ", dropout=" << o.dropout();
    if (o.use_rslora()) stream << ", rslora";
    if (o.use_dora()) stream << ", dora";
    if (is_merged(name)) stream << ", merged";
  }
  if (!enabled_) stream << "; disabled";
  stream << ")";
}

template class LoRALayer<LoRALinearAdapterImpl>;
template class LoRALayer<LoRAEmbeddingAdapterImpl>;

}  // namespace d9d::peft
