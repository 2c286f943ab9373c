#pragma once

#include <d9d/model_state/mapper/mapper.h>

namespace d9d::model_state {

/// An `Identity` for every output key of `mapper`: passes through, unchanged,
/// exactly what `mapper` produces (e.g. to re-read a converted checkpoint).
///
/// ```
/// auto same = d9d::model_state::identity_mapper_from_mapper_outputs(*converter);
/// ```
MapperPtr identity_mapper_from_mapper_outputs(const ModelStateMapper& mapper);

}  // namespace d9d::model_state
