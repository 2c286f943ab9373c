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
            "kind: field required: one of \"lora\", \"full_tune\", \"stack\", \"ia3\"");
  EXPECT_EQ(error_of(R"({"kind":"lorax"})"),
            "kind: unknown kind \"lorax\"; expected one of \"lora\", \"full_tune\", \"stack\", \"ia3\"");
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
            "methods[0].params.rank: unknown field; allowed fields are r, alpha, dropout, use_rslora, use_dora");
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
