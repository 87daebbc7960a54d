/* sampler.c - which layers a Drop-Muon step updates (docs/method.md sections 2 and 3).
 *
 * Every draw is a pure function of (config, step): Philox4x32-10 keyed by the seed with the step
 * as counter. There is no generator state to save, resume or broadcast. */
#include "internal.h"

/* ---- Philox4x32-10 (Salmon et al., SC'11; constants of Random123) ---------------------------- */
static void philox4x32_10(uint32_t ctr[4], uint32_t key0, uint32_t key1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key0 += 0x9E3779B9u;
            key1 += 0xBB67AE85u;
        }
        const uint64_t p0 = (uint64_t)0xD2511F53u * ctr[0];
        const uint64_t p1 = (uint64_t)0xCD9E8D57u * ctr[2];
        const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        const uint32_t c1 = ctr[1], c3 = ctr[3];
        ctr[0] = hi1 ^ c1 ^ key0;
        ctr[1] = lo1;
        ctr[2] = hi0 ^ c3 ^ key1;
        ctr[3] = lo0;
    }
}

double dm_random_uniform(uint64_t seed, uint64_t step, uint64_t index) {
    uint32_t ctr[4] = {(uint32_t)step, (uint32_t)(step >> 32), (uint32_t)index,
                       (uint32_t)(index >> 32)};
    philox4x32_10(ctr, (uint32_t)seed, (uint32_t)(seed >> 32));
    const uint64_t word = ((uint64_t)ctr[0] << 32) | ctr[1];
    return (double)(word >> 11) * 0x1.0p-53;
}

/* ---- distributions over the cutoff --------------------------------------------------------- */

/* EPOCH_SHIFT: exp(tilt * x_i), x_i = i / (n - 1), divided by the largest weight so that
 * nothing overflows or underflows to an all-zero sum. The largest sits at x = 0 when tilt <= 0,
 * else at the deepest layer (x = 1), except for a single layer, whose only x is 0. */
static double epoch_shift_weight(const dm_sampler_config *config, int64_t i) {
    const int64_t n = config->num_layers;
    const double tilt = config->shift_strength * (2.0 * config->progress - 1.0);
    const double x = n > 1 ? (double)i / (double)(n - 1) : 0.0;
    const double x_largest = tilt > 0.0 && n > 1 ? 1.0 : 0.0;
    return exp(tilt * x - tilt * x_largest);
}

/* Validates the config; *normaliser gets what probability_at divides by. */
static dm_status prepare(const dm_sampler_config *config, double *normaliser) {
    if (!config || config->num_layers < 1) return DM_ERR_INVALID_ARG;
    const int64_t n = config->num_layers;
    *normaliser = 1.0;
    switch (config->kind) {
    case DM_SAMPLING_FULL:
    case DM_SAMPLING_UNIFORM: return DM_OK;
    case DM_SAMPLING_CUSTOM: {
        if (!config->probabilities) return DM_ERR_PROBABILITY;
        double sum = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            const double p = config->probabilities[i];
            if (!isfinite(p) || p < 0.0) return DM_ERR_PROBABILITY;
            sum += p;
        }
        return fabs(sum - 1.0) <= 1e-6 ? DM_OK : DM_ERR_PROBABILITY;
    }
    case DM_SAMPLING_TAU_NICE:
        return config->tau >= 1 && config->tau <= n ? DM_OK : DM_ERR_INVALID_ARG;
    case DM_SAMPLING_EPOCH_SHIFT: {
        const double progress = config->progress, strength = config->shift_strength;
        if (!(progress >= 0.0 && progress <= 1.0)) return DM_ERR_INVALID_ARG;
        if (!isfinite(strength) || strength < 0.0) return DM_ERR_INVALID_ARG;
        double sum = 0.0;
        for (int64_t i = 0; i < n; ++i) sum += epoch_shift_weight(config, i);
        *normaliser = sum; /* >= 1: the largest weight is 1 */
        return DM_OK;
    }
    case DM_SAMPLING_COST_OPTIMAL: {
        if (!config->smoothness) return DM_ERR_INVALID_ARG;
        double running_max = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            const double l = config->smoothness[i];
            if (!isfinite(l) || l < 0.0) return DM_ERR_INVALID_ARG;
            if (l > running_max) running_max = l;
        }
        if (!(running_max > 0.0)) return DM_ERR_INVALID_ARG;
        *normaliser = running_max;
        return DM_OK;
    }
    }
    return DM_ERR_INVALID_ARG;
}

/* What probability_at carries from layer i - 1 to layer i: the calls go i = 0, 1, ... so that
 * a whole distribution costs O(num_layers). */
typedef struct layer_walk {
    double running_max; /* COST_OPTIMAL: R_{i-1} */
    double at_least;    /* TAU_NICE: P(lowest chosen layer >= i) */
} layer_walk;

static const layer_walk kWalkStart = {0.0, 1.0};

/* P(cutoff = i) for a prepared config, i = 0, 1, ... in turn with the same walk. */
static double probability_at(const dm_sampler_config *config, double normaliser, int64_t i,
                             layer_walk *walk) {
    const int64_t n = config->num_layers;
    switch (config->kind) {
    case DM_SAMPLING_FULL: return i == 0 ? 1.0 : 0.0;
    case DM_SAMPLING_UNIFORM: return 1.0 / (double)n;
    case DM_SAMPLING_CUSTOM: return config->probabilities[i];
    case DM_SAMPLING_TAU_NICE: {
        /* P(min >= i) = C(n - i, tau) / C(n, tau), a product of ratios, one more per layer. */
        const double at_least_i = walk->at_least;
        double at_least_next = at_least_i * (double)(n - i - config->tau) / (double)(n - i);
        if (at_least_next < 0.0) at_least_next = 0.0;
        walk->at_least = at_least_next;
        return at_least_i - at_least_next;
    }
    case DM_SAMPLING_EPOCH_SHIFT: return epoch_shift_weight(config, i) / normaliser;
    case DM_SAMPLING_COST_OPTIMAL: {
        const double l = config->smoothness[i];
        const double previous = walk->running_max;
        if (l > walk->running_max) walk->running_max = l;
        return (walk->running_max - previous) / normaliser;
    }
    }
    return 0.0;
}

dm_status dm_sampler_distribution(const dm_sampler_config *config, double *cutoff_probabilities) {
    double normaliser;
    layer_walk walk = kWalkStart;
    DMI_RETURN_IF_ERROR(prepare(config, &normaliser));
    if (!cutoff_probabilities) return DM_ERR_INVALID_ARG;
    for (int64_t i = 0; i < config->num_layers; ++i)
        cutoff_probabilities[i] = probability_at(config, normaliser, i, &walk);
    return DM_OK;
}

dm_status dm_sample_layers(const dm_sampler_config *config, uint64_t step, uint8_t *active_mask,
                           int64_t *cutoff) {
    double normaliser;
    layer_walk walk = kWalkStart;
    DMI_RETURN_IF_ERROR(prepare(config, &normaliser));
    const int64_t n = config->num_layers;
    int64_t lowest = -1;

    if (config->kind == DM_SAMPLING_TAU_NICE) {
        /* Selection sampling (Knuth's Algorithm S): layer i joins with probability
         * (still needed) / (still available); uniform over tau-subsets, one draw per layer. */
        int64_t needed = config->tau;
        for (int64_t i = 0; i < n; ++i) {
            const int take =
                needed > 0 && (double)(n - i) * dm_random_uniform(config->seed, step, (uint64_t)i) <
                                  (double)needed;
            if (take) {
                --needed;
                if (lowest < 0) lowest = i;
            }
            if (active_mask) active_mask[i] = (uint8_t)take;
        }
    } else {
        /* Inverse CDF; rounding can leave the total a hair under u, then the deepest layer with
         * positive probability is the answer (the loop has then seen every layer). */
        const double u =
            config->kind == DM_SAMPLING_FULL ? 0.0 : dm_random_uniform(config->seed, step, 0);
        double cumulative = 0.0;
        int64_t last_positive = 0;
        for (int64_t i = 0; i < n && lowest < 0; ++i) {
            const double p = probability_at(config, normaliser, i, &walk);
            if (p > 0.0) last_positive = i;
            cumulative += p;
            if (p > 0.0 && u < cumulative) lowest = i;
        }
        if (lowest < 0) lowest = last_positive;
        for (int64_t i = 0; active_mask && i < n; ++i) active_mask[i] = (uint8_t)(i >= lowest);
    }
    if (cutoff) *cutoff = lowest;
    return DM_OK;
}
