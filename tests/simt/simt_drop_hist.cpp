// Test-only pack variant: the barrier after the histogram is left out.
#define DROPIT_SIMT_HOST 1
#define DROPIT_KERNEL_NS kernels_drop_hist
#define DROPIT_TEST_DROP_BARRIER 1
#define SIMT_PACK_FN pack_drop_hist
#include "simt_variant.inc"
