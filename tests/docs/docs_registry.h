#pragma once
// Each generated file registers its page, so docs_samples can say what it checked.

#include <cstddef>

namespace docs {

/// Records that `page` contributed `samples` compiled code blocks.
bool register_page(const char* page, std::size_t samples);

}  // namespace docs
