#include "CFaultFloor.h"
