package storage

import "context"

// reachCache holds verdicts of followable; it forgets them all when full,
// which costs walks again, never a wrong verdict.
type reachCache map[string]bool

func (rc *reachCache) set(name string, ok bool) {
	if *rc == nil || len(*rc) >= reachCap {
		*rc = make(reachCache, 1024)
	}
	(*rc)[name] = ok
}

// followable reports whether the parents of r (stored under name) lead to
// a base without a missing parent or a loop. It walks them by lookups
// until a known verdict, finding a loop by Brent's method (so without
// holding the path), and settles the verdict of every record it walked,
// up to reachCap of them.
func (c *scopeChecker) followable(ctx context.Context, name string, r *record) (bool, error) {
	path := []string{name}
	settle := func(ok bool) (bool, error) {
		for _, n := range path {
			c.reach.set(n, ok)
		}
		return ok, nil
	}
	tortoise, power, steps := name, 1, 0
	for cur := r.Parent; cur != ""; {
		if cur == tortoise {
			return settle(false) // a loop
		}
		if ok, known := c.reach[cur]; known {
			return settle(ok)
		}
		p, err := c.lookup(ctx, cur)
		if err != nil {
			return false, err
		}
		if p == nil {
			return settle(false)
		}
		if len(path) < reachCap {
			path = append(path, cur)
		}
		if steps++; steps == power {
			tortoise, power, steps = cur, 2*power, 0
		}
		cur = p.Parent
	}
	return settle(true)
}
