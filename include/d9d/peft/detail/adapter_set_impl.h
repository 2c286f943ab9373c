#pragma once

// The definitions of AdapterSetLayer, for the sources that instantiate it
// (one per method: `template class AdapterSetLayer<MyAdapterImpl>;`).

#include <d9d/peft/adapter_set.h>
#include <d9d/peft/errors.h>

#include <torch/nn/modules/container/moduledict.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>

namespace d9d::peft {

template <typename Adapter>
std::vector<std::string> AdapterSetLayer<Adapter>::adapter_names() const {
  std::vector<std::string> out;
  for (const auto& e : entries_) out.push_back(e.first);
  return out;
}

template <typename Adapter>
std::shared_ptr<Adapter> AdapterSetLayer<Adapter>::find(const std::string& name) const {
  for (const auto& e : entries_) {
    if (e.first == name) return e.second;
  }
  return nullptr;
}

template <typename Adapter>
Adapter& AdapterSetLayer<Adapter>::adapter(const std::string& name) const {
  if (auto a = find(name)) return *a;
  const auto held = adapter_names();
  throw PeftError(fmt::format("this {} layer has no adapter \"{}\"; it holds {}", peft_type(), name,
                              held.empty() ? std::string("none")
                                           : fmt::format("\"{}\"", fmt::join(held, "\", \""))));
}

template <typename Adapter>
Adapter& AdapterSetLayer<Adapter>::pick(const std::string& name) const {
  if (!name.empty()) return adapter(name);
  if (entries_.empty()) throw PeftError(fmt::format("this {} layer holds no adapter (the last one was deleted)", peft_type()));
  return *entries_.front().second;
}

template <typename Adapter>
std::string AdapterSetLayer<Adapter>::key_prefix(const std::string& name) const {
  adapter(name);  // throws if absent
  return entries_.front().first == name ? std::string() : "adapters." + name + ".";
}

template <typename Adapter>
bool AdapterSetLayer<Adapter>::is_active(const std::string& name) const {
  return std::find(active_.begin(), active_.end(), name) != active_.end();
}

template <typename Adapter>
void AdapterSetLayer<Adapter>::set_active_adapters(const std::vector<std::string>& names) {
  active_.clear();
  for (const auto& [name, adapter] : entries_) {
    const bool on = std::find(names.begin(), names.end(), name) != names.end();
    if (on) active_.push_back(name);
    for (auto& p : adapter->parameters()) p.requires_grad_(on);
  }
}

template <typename Adapter>
void AdapterSetLayer<Adapter>::append(const std::string& name, std::shared_ptr<Adapter> adapter) {
  validate_adapter_name(name);
  if (find(name)) throw PeftError(fmt::format("this {} layer already holds an adapter \"{}\"", peft_type(), name));
  for (auto& p : adapter->parameters()) p.requires_grad_(false);
  entries_.emplace_back(name, std::move(adapter));
  relayout();
}

template <typename Adapter>
void AdapterSetLayer<Adapter>::delete_adapter(const std::string& name) {
  adapter(name);  // throws if absent
  entries_.erase(std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.first == name; }));
  active_.erase(std::remove(active_.begin(), active_.end(), name), active_.end());
  merged_.erase(std::remove(merged_.begin(), merged_.end(), name), merged_.end());
  relayout();
}

template <typename Adapter>
Adapter& AdapterSetLayer<Adapter>::require_merged(const std::string& name, bool merged, const char* what) const {
  Adapter& a = adapter(name);
  if (is_merged(name) != merged) {
    throw PeftError(fmt::format("{}: adapter \"{}\" is {} merged", what, name, merged ? "not" : "already"));
  }
  return a;
}

template <typename Adapter>
bool AdapterSetLayer<Adapter>::is_merged(const std::string& name) const {
  return std::find(merged_.begin(), merged_.end(), name) != merged_.end();
}

template <typename Adapter>
void AdapterSetLayer<Adapter>::set_merged(const std::string& name, bool merged) {
  merged_.erase(std::remove(merged_.begin(), merged_.end(), name), merged_.end());
  if (merged) merged_.push_back(name);
}

template <typename Adapter>
std::vector<std::string> AdapterSetLayer<Adapter>::fresh_state_keys() const {
  std::vector<std::string> keys;
  for (const auto& [name, adapter] : entries_) {
    const std::string prefix = key_prefix(name);
    for (const auto& p : adapter->named_parameters()) keys.push_back(prefix + p.key());
  }
  return keys;
}

template <typename Adapter>
void AdapterSetLayer<Adapter>::clear_further_adapters() {
  if (named_children().contains("adapters")) unregister_module("adapters");
}

template <typename Adapter>
void AdapterSetLayer<Adapter>::register_further_adapters() {
  if (entries_.size() < 2) return;
  torch::nn::ModuleDict more;
  for (size_t i = 1; i < entries_.size(); ++i) {
    more->update(std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{
        {entries_[i].first, entries_[i].second}});
  }
  register_module("adapters", more.ptr());
}

template <typename Adapter>
void AdapterSetLayer<Adapter>::print_adapters(std::ostream& stream, const char* type) const {
  stream << type << "(";
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& name = entries_[i].first;
    if (i) stream << "; ";
    if (entries_.size() > 1 || name != kDefaultAdapterName) stream << name << (is_active(name) ? "*" : "") << ": ";
    describe(stream, *entries_[i].second);
    if (is_merged(name)) stream << ", merged";
  }
  if (!enabled_) stream << "; disabled";
  stream << ")";
}

}  // namespace d9d::peft
