// r1/r1.hpp: the whole library. Include single headers instead to compile faster.
#pragma once

#include "config.hpp"
#include "device.hpp"
#include "embedding.hpp"
#include "generate.hpp"
#include "linear.hpp"
#include "loss.hpp"
#include "mla.hpp"
#include "mlp.hpp"
#include "model.hpp"
#include "moe.hpp"
#include "norm.hpp"
#include "numeric.hpp"
#include "optim.hpp"
#include "parallel.hpp"
#include "rope.hpp"
#include "tensor.hpp"
