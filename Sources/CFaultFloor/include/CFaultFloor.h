// The C floor for `postcopy bench faults`: the same measurement loops as the Swift path.
#ifndef CFAULTFLOOR_H
#define CFAULTFLOOR_H
#endif
