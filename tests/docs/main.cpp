// docs_samples: the code blocks of README.md and docs/*.md, compiled. That it
// builds is the check; running it lists what was compiled.
#include "docs_registry.h"

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace docs {

namespace {
std::vector<std::pair<std::string, std::size_t>>& pages() {
  static std::vector<std::pair<std::string, std::size_t>> all;
  return all;
}
}  // namespace

bool register_page(const char* page, std::size_t samples) {
  pages().emplace_back(page, samples);
  return true;
}

}  // namespace docs

int main() {
  std::size_t total = 0;
  for (const auto& [page, samples] : docs::pages()) {
    std::printf("%-28s %zu code block(s) compiled\n", page.c_str(), samples);
    total += samples;
  }
  std::printf("%zu code blocks from %zu pages compiled\n", total, docs::pages().size());
  return total > 0 ? 0 : 1;
}
