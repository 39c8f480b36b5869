package storage

import (
	"context"
	"fmt"
	"maps"
	"slices"
)

// checkHostScopes checks each scope of a host-scoped root as Check checks
// a store, then what ties the scopes together: IDs, shared layers and
// their references, and the content index.
func checkHostScopes(ctx context.Context, sx scopedTx, limit uint64) ([]Problem, error) {
	hosts, err := sx.rootHosts(ctx)
	if err != nil {
		return nil, err
	}
	rc := rootChecker{byID: map[uint64][]binding{}, layers: map[uint64]*layer{}, indexed: map[uint64][]contentEntry{}}
	for _, h := range hosts {
		view := sx.inHost(h)
		found, err := checkScope(ctx, view, limit)
		if err != nil {
			return nil, err
		}
		for _, p := range found {
			p.Host = h
			rc.found = append(rc.found, p)
		}
		err = view.scan(ctx, func(name string, r *record, decodeErr error) error {
			if checkable(name, decodeErr, view.maxName()) {
				kept := checkCopy(r)
				rc.byID[r.ID] = append(rc.byID[r.ID], binding{layerRef{h, name}, &kept})
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	err = sx.unscoped().scan(ctx, func(name string, _ *record, _ error) error {
		rc.report("", name, "record lies outside the host scopes of a host-scoped root")
		return nil
	})
	if err != nil {
		return nil, err
	}
	// A scope of a host the root does not list (forgotten, or never
	// opened) is no scope: its records are nobody's. Its deletion markers,
	// which ReleaseHost leaves, are not records.
	owners, err := sx.scopeOwners(ctx)
	if err != nil {
		return nil, err
	}
	for _, h := range owners {
		if _, listed := slices.BinarySearch(hosts, h); listed {
			continue
		}
		err := sx.inHost(h).scan(ctx, func(name string, _ *record, _ error) error {
			rc.report(h, name, "record lies in the scope of a host the root does not list")
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	err = sx.scanLayers(ctx, func(id uint64, l *layer, err error) error {
		if err != nil {
			rc.report("", "", "shared layer %d does not decode: %v", id, err)
			return nil
		}
		rc.layers[id] = l
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = sx.scanContent(ctx, func(key string, e contentEntry, err error) error {
		if err != nil {
			rc.report("", "", "content index entry of %q does not decode: %v", key, err)
			return nil
		}
		l := rc.layers[e.id]
		switch {
		case l == nil:
			rc.report("", "", "content index entry %q names layer %d, which does not exist", key, e.id)
		case l.Content != key || l.parentID() != e.parentID:
			rc.report("", "", "content index entry %q of layer %d (parent %d) does not match the layer (content %q, parent %d)", key, e.id, e.parentID, l.Content, l.parentID())
		default:
			rc.indexed[e.id] = append(rc.indexed[e.id], e)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	rc.judge()
	return rc.found, nil
}

// binding is a record of some scope, by host and name.
type binding struct {
	at layerRef
	r  *record
}

// rootChecker judges what ties the scopes of a root together.
type rootChecker struct {
	byID    map[uint64][]binding
	layers  map[uint64]*layer
	indexed map[uint64][]contentEntry
	found   []Problem
}

func (rc *rootChecker) report(host, name, format string, args ...any) {
	rc.found = append(rc.found, Problem{Host: host, Snapshot: name, Detail: fmt.Sprintf(format, args...)})
}

func (rc *rootChecker) judge() {
	for _, id := range slices.Sorted(maps.Keys(rc.byID)) {
		bs := rc.byID[id]
		l := rc.layers[id]
		if l == nil {
			for _, b := range bs {
				if b.r.Content != "" {
					rc.report(b.at.Host, b.at.Name, "binding of shared layer %d, which does not exist", id)
				}
			}
			if hostsOf(bs) > 1 {
				rc.report(bs[0].at.Host, bs[0].at.Name, "ID %d is also held by %s", id, describeBindings(bs[1:]))
			}
			continue
		}
		bound := map[layerRef]bool{}
		for _, b := range bs {
			switch {
			case b.r.Content != l.Content:
				rc.report(b.at.Host, b.at.Name, "has the ID of shared layer %d (content %q) but is not its binding", id, l.Content)
			case !slices.Contains(l.Refs, b.at):
				rc.report(b.at.Host, b.at.Name, "binding is not counted among the references of shared layer %d", id)
			case !slices.Equal(b.r.ParentIDs, l.ParentIDs) && len(b.r.ParentIDs) > 0:
				rc.report(b.at.Host, b.at.Name, "parent chain %v differs from its shared layer's %v", b.r.ParentIDs, l.ParentIDs)
			}
			bound[b.at] = true
		}
		for _, ref := range l.Refs {
			if !bound[ref] {
				rc.report("", "", "shared layer %d counts a reference by host %q as %q, which is no binding of it", id, ref.Host, ref.Name)
			}
		}
	}
	for _, id := range slices.Sorted(maps.Keys(rc.layers)) {
		l := rc.layers[id]
		if len(l.Refs) == 0 {
			rc.report("", "", "shared layer %d has no references; it should have gone with the last", id)
		}
		if !slices.IsSortedFunc(l.Refs, layerRef.compare) {
			rc.report("", "", "shared layer %d keeps its references out of order", id)
		}
		if n := len(rc.indexed[id]); n != 1 {
			rc.report("", "", "shared layer %d has %d content index entries, not 1", id, n)
		}
	}
}

func hostsOf(bs []binding) int {
	hosts := map[string]bool{}
	for _, b := range bs {
		hosts[b.at.Host] = true
	}
	return len(hosts)
}

func describeBindings(bs []binding) string {
	s := ""
	for i, b := range bs {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%q of host %q", b.at.Name, b.at.Host)
	}
	return s
}
