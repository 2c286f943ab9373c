// PEFT configurations: JSON in the Python original's format, validation errors.
#include <d9d/peft/all/config.h>
#include <d9d/peft/all/method.h>
#include <d9d/peft/errors.h>
#include <d9d/peft/lora/method.h>

#include <nlohmann/json.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

using d9d::peft::AnyPeftConfig;
using d9d::peft::ConfigError;
using ::testing::HasSubstr;

namespace {

// The exact compact JSON pydantic's model_dump_json() writes for this stack.
const char* kStackJson =
    R"({"kind":"stack","methods":[{"kind":"lora","module_name_pattern":".*attention\\..*_proj",)"
    R"("params":{"r":8,"alpha":16,"dropout":0.05}},{"kind":"full_tune","module_name_pattern":".*norm.*"}]})";

std::string error_of(const std::string& text) {
  try {
    d9d::peft::parse_peft_config(text);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST(Config, ParsesTheOriginalsStackJson) {
  auto config = nlohmann::json::parse(kStackJson).get<AnyPeftConfig>();
  ASSERT_EQ(config.kind(), "stack");
  const auto& stack = config.get<d9d::peft::PeftStackConfig>();
  ASSERT_EQ(stack.methods.size(), 2u);
  const auto& lora = stack.methods[0].get<d9d::peft::LoRAConfig>();
  EXPECT_EQ(lora.module_name_pattern, R"(.*attention\..*_proj)");
  EXPECT_EQ(lora.params.r(), 8);
  EXPECT_EQ(lora.params.alpha(), 16);
  EXPECT_DOUBLE_EQ(lora.params.dropout(), 0.05);
  const auto& full = stack.methods[1].get<d9d::peft::FullTuneConfig>();
  EXPECT_EQ(full.module_name_pattern, ".*norm.*");
}

TEST(Config, DumpIsByteIdenticalToTheOriginal) {
  EXPECT_EQ(d9d::peft::dump_peft_config(d9d::peft::parse_peft_config(kStackJson)), kStackJson);
  d9d::peft::LoRAConfig lora{"q", d9d::peft::LoRAParameters().r(4).alpha(8)};
  EXPECT_EQ(d9d::peft::dump_peft_config(lora),
            R"({"kind":"lora","module_name_pattern":"q","params":{"r":4,"alpha":8,"dropout":0.0}})");
}

TEST(Config, JsonRoundTripsThroughNlohmann) {
  d9d::peft::PeftStackConfig inner{{d9d::peft::FullTuneConfig{"norm"}}};
  AnyPeftConfig config = d9d::peft::PeftStackConfig{{d9d::peft::LoRAConfig{"a|b", d9d::peft::LoRAParameters().r(2).alpha(4).dropout(0.1)}, inner}};
  nlohmann::json j = config;
  EXPECT_EQ(j["methods"][1]["methods"][0]["kind"], "full_tune");
  auto back = j.get<AnyPeftConfig>();
  EXPECT_EQ(d9d::peft::dump_peft_config(back), d9d::peft::dump_peft_config(config));
  // Single configs convert on their own too.
  auto lora = nlohmann::json::parse(R"({"module_name_pattern":"x","params":{"r":1,"alpha":1,"dropout":0}})")
                  .get<d9d::peft::LoRAConfig>();
  EXPECT_EQ(lora.params.r(), 1);
}

TEST(Config, IntegralFloatsAreAcceptedLikePydantic) {
  auto c = d9d::peft::parse_peft_config(
      R"({"kind":"lora","module_name_pattern":"x","params":{"r":8.0,"alpha":16,"dropout":0}})");
  EXPECT_EQ(c.get<d9d::peft::LoRAConfig>().params.r(), 8);
}

TEST(Config, ErrorsNameThePathAndTheRule) {
  EXPECT_EQ(error_of(R"({"kind":"stack","methods":[{"kind":"lora","module_name_pattern":"x",)"
                     R"("params":{"r":0,"alpha":16,"dropout":0.05}}]})"),
            "methods[0].params.r: must be >= 1, got 0");
  EXPECT_EQ(error_of(R"({"kind":"lora","module_name_pattern":"x","params":{"r":8,"alpha":0,"dropout":0}})"),
            "params.alpha: must be >= 1, got 0");
  EXPECT_EQ(error_of(R"({"kind":"lora","module_name_pattern":"x","params":{"r":8,"alpha":8,"dropout":1.0}})"),
            "params.dropout: must be in [0, 1), got 1");
  EXPECT_EQ(error_of(R"({"kind":"lora","module_name_pattern":"x","params":{"r":8.5,"alpha":8,"dropout":0}})"),
            "params.r: expected an integer, got 8.5");
  EXPECT_EQ(error_of(R"({"kind":"lora","module_name_pattern":"x","params":{"r":"8","alpha":8,"dropout":0}})"),
            "params.r: expected an integer, got \"8\"");
  EXPECT_EQ(error_of(R"({"kind":"lora","module_name_pattern":"x","params":{"alpha":8,"dropout":0}})"),
            "params.r: field required");
  EXPECT_EQ(error_of(R"({"kind":"full_tune"})"), "module_name_pattern: field required");
  EXPECT_EQ(error_of(R"({"module_name_pattern":"x"})"),
            "kind: field required: one of \"lora\", \"full_tune\", \"stack\", \"ia3\", \"loha\", \"lokr\", \"oft\", \"vera\"");
  EXPECT_EQ(error_of(R"({"kind":"lorax"})"),
            "kind: unknown kind \"lorax\"; expected one of \"lora\", \"full_tune\", \"stack\", \"ia3\", \"loha\", \"lokr\", \"oft\", \"vera\"");
  EXPECT_EQ(error_of(R"({"kind":"stack","methods":[]})"), "methods: must hold at least one method");
  EXPECT_EQ(error_of(R"({"kind":"stack","methods":{}})"), "methods: expected a list, got {}");
  EXPECT_EQ(error_of(R"({"kind":"stack","methods":[3]})"), "methods[0]: expected an object, got number 3");
  EXPECT_EQ(error_of(R"({"kind":"full_tune","module_name_pattern":""})"),
            "module_name_pattern: must not be empty (it must fully match qualified module names)");
}

TEST(Config, UnknownFieldsAreErrors) {
  EXPECT_EQ(error_of(R"({"kind":"full_tune","module_name_pattern":"x","extra":1})"),
            "extra: unknown field; allowed fields are kind, module_name_pattern");
  EXPECT_EQ(error_of(R"({"kind":"stack","methods":[{"kind":"lora","module_name_pattern":"x",)"
                     R"("params":{"r":8,"alpha":8,"dropout":0,"rank":4}}]})"),
            "methods[0].params.rank: unknown field; allowed fields are r, alpha, dropout, use_rslora, use_dora, init");
}

TEST(Config, BadRegexIsAnError) {
  EXPECT_THAT(error_of(R"({"kind":"full_tune","module_name_pattern":".*("})"),
              HasSubstr("module_name_pattern: invalid regular expression \".*(\""));
  // Constructing a method validates too.
  EXPECT_THAT([] { d9d::peft::LoRA({"[", d9d::peft::LoRAParameters().r(8).alpha(16)}); },
              ::testing::ThrowsMessage<ConfigError>(HasSubstr("module_name_pattern: invalid regular expression")));
  EXPECT_THAT([] { d9d::peft::LoRA({"x", d9d::peft::LoRAParameters().r(0).alpha(16)}); },
              ::testing::ThrowsMessage<ConfigError>(HasSubstr("params.r: must be >= 1, got 0")));
}

TEST(Config, SyntaxErrorsNameTheSource) {
  try {
    d9d::peft::parse_peft_config("{not json", "run.json");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_THAT(e.what(), HasSubstr("run.json: not valid JSON"));
  }
}

TEST(Config, FactoryBuildsTheDescribedMethods) {
  auto method = d9d::peft::peft_method_from_config(d9d::peft::parse_peft_config(kStackJson));
  auto* stack = dynamic_cast<d9d::peft::PeftStack*>(method.get());
  ASSERT_NE(stack, nullptr);
  ASSERT_EQ(stack->methods().size(), 2u);
  auto* lora = dynamic_cast<d9d::peft::LoRA*>(stack->methods()[0].get());
  ASSERT_NE(lora, nullptr);
  EXPECT_EQ(lora->config().params.r(), 8);
  EXPECT_EQ(stack->config().methods.size(), 2u);
}

// ------------------------------------------------------------------ patterns

#include <d9d/peft/hf/config.h>
#include <d9d/peft/pattern.h>

namespace {

std::string hf_config_error(const std::string& patch) {
  auto j = nlohmann::json::parse(R"({"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"]})");
  j.merge_patch(nlohmann::json::parse(patch));
  try {
    d9d::peft::hf::parse_lora_config(j, "adapter_config.json");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST(Patterns, FullMatchLikePythonRe) {
  const d9d::peft::Pattern p(".*\\.(q|v)_proj", "module_name_pattern");
  EXPECT_TRUE(p.full_match("layers.0.attention.q_proj"));
  EXPECT_FALSE(p.full_match("layers.0.attention.q_proj.lora_A"));  // the whole name, not a prefix
  EXPECT_FALSE(p.full_match("xlayers.0.attention.k_proj"));
  // Python re syntax RE2 shares: named groups, classes, flags, lazy repeats.
  EXPECT_TRUE(d9d::peft::Pattern("(?P<layer>layers\\.\\d+)\\.mlp\\.(up|down)_proj", "p").full_match("layers.12.mlp.up_proj"));
  EXPECT_TRUE(d9d::peft::Pattern("(?i)LAYERS\\..*?PROJ", "p").full_match("layers.3.q_proj"));
  EXPECT_TRUE(d9d::peft::Pattern("", "p").full_match(""));
  EXPECT_FALSE(d9d::peft::Pattern("", "p").full_match("x"));
}

TEST(Patterns, PathologicalPatternsRunInLinearTimeAndBoundedStack) {
  // A backtracking matcher overflows its stack on the first (the name is
  // 200,000 characters) and takes about 2^n steps on the second: a test
  // process on std::regex crashes or runs into ctest's timeout here.
  const std::string long_name(200000, 'x');
  EXPECT_FALSE(d9d::peft::Pattern("(x|y)*z", "p").full_match(long_name));
  EXPECT_TRUE(d9d::peft::Pattern("(x|y)*", "p").full_match(long_name));
  const std::string almost(64, 'a');
  EXPECT_FALSE(d9d::peft::Pattern("(a+)+$", "p").full_match(almost + "!"));
  EXPECT_FALSE(d9d::peft::Pattern("(a|aa)*b", "p").full_match(almost));
  // The same through a PEFT config's selector and the d9d LoRA method.
  const auto config = d9d::peft::hf::parse_lora_config(
      nlohmann::json::parse(R"({"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":"(x|y)*z"})"),
      "adapter_config.json");
  EXPECT_FALSE(config.select(long_name).has_value());
  EXPECT_TRUE(config.select(long_name + "z").has_value());
}

TEST(Patterns, SyntaxRe2LacksIsRefusedWithTheFieldNamed) {
  // d9d JSON: the field path, the reason, and where the syntax is described.
  const std::string lookahead = error_of(R"({"kind":"lora","module_name_pattern":"(?!lm_head).*",)"
                                         R"("params":{"r":8,"alpha":16,"dropout":0}})");
  EXPECT_THAT(lookahead, HasSubstr("module_name_pattern: invalid regular expression \"(?!lm_head).*\""));
  EXPECT_THAT(lookahead, HasSubstr("lookahead and lookbehind are not supported"));
  EXPECT_THAT(lookahead, HasSubstr("docs/config-reference.md"));
  EXPECT_THAT(error_of(R"({"kind":"full_tune","module_name_pattern":"(a)\\1"})"),
              HasSubstr("module_name_pattern: invalid regular expression \"(a)\\1\""));
  EXPECT_THAT(error_of(R"({"kind":"stack","methods":[{"kind":"full_tune","module_name_pattern":"x{1001}"}]})"),
              HasSubstr("methods[0].module_name_pattern: invalid regular expression \"x{1001}\""));
  // adapter_config.json: file and field.
  EXPECT_THAT(hf_config_error(R"j({"target_modules":".*(?<!lm_head)"})j"),
              HasSubstr("adapter_config.json: target_modules: invalid regular expression"));
  EXPECT_THAT(hf_config_error(R"({"exclude_modules":"lm_head\\Z"})"),
              HasSubstr("adapter_config.json: exclude_modules: invalid regular expression \"lm_head\\Z\": "));
  EXPECT_THAT(hf_config_error(R"({"exclude_modules":"lm_head\\Z"})"), HasSubstr("\\Z is not supported"));
  EXPECT_THAT(hf_config_error(R"({"rank_pattern":{"(?=q)q_proj":2}})"),
              HasSubstr("adapter_config.json: rank_pattern.(?=q)q_proj: the key is not a valid pattern"));
  // The Pattern type itself.
  EXPECT_THAT([] { d9d::peft::Pattern("[", "target"); },
              ::testing::ThrowsMessage<ConfigError>(HasSubstr("target: invalid regular expression \"[\"")));
  EXPECT_EQ(d9d::peft::Pattern::syntax_error(".*_proj"), "");
}
