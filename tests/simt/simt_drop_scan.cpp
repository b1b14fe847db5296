// Test-only pack variant: the barrier in the digit scan is left out.
#define DROPIT_SIMT_HOST 1
#define DROPIT_KERNEL_NS kernels_drop_scan
#define DROPIT_TEST_DROP_BARRIER 2
#define SIMT_PACK_FN pack_drop_scan
#include "simt_variant.inc"
