package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/snapmeta/storage"
)

// Record is one snapshot with every stored field: the unit of ls --json,
// export, import and migrate. Its JSON form is one line of an export.
type Record struct {
	Name    string            `json:"name"`
	ID      string            `json:"id"`
	Kind    Kind              `json:"kind"`
	Parent  string            `json:"parent"`
	Labels  map[string]string `json:"labels"`
	Created time.Time         `json:"created"`
	Updated time.Time         `json:"updated"`
	Usage   Usage             `json:"usage"`
	// Host is the host scope of the snapshot on a host-scoped etcd root
	// (left out elsewhere); Content is the content key of a binding of a
	// shared layer (left out for every other snapshot).
	Host    string `json:"host,omitempty"`
	Content string `json:"content,omitempty"`
}

// Usage is the disk usage of a committed snapshot (zero for others).
type Usage struct {
	Size   int64 `json:"size"`
	Inodes int64 `json:"inodes"`
}

// Kind is a snapshot kind written as containerd's filters name it: active,
// view or committed.
type Kind snapshots.Kind

func (k Kind) String() string {
	switch snapshots.Kind(k) {
	case snapshots.KindActive:
		return "active"
	case snapshots.KindView:
		return "view"
	case snapshots.KindCommitted:
		return "committed"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// MarshalText writes the kind's name.
func (k Kind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText reads a kind's name, in any case.
func (k *Kind) UnmarshalText(b []byte) error {
	switch strings.ToLower(string(b)) {
	case "active":
		*k = Kind(snapshots.KindActive)
	case "view":
		*k = Kind(snapshots.KindView)
	case "committed":
		*k = Kind(snapshots.KindCommitted)
	default:
		return fmt.Errorf("unknown snapshot kind %q (want active, view or committed)", b)
	}
	return nil
}

// MarshalJSON writes labels as {} rather than null, and times in UTC.
func (r Record) MarshalJSON() ([]byte, error) {
	type plain Record
	p := plain(r)
	if p.Labels == nil {
		p.Labels = map[string]string{}
	}
	p.Created, p.Updated = p.Created.UTC(), p.Updated.UTC()
	return json.Marshal(p)
}

// newRecord builds a record from what GetInfo returns.
func newRecord(id string, info snapshots.Info, usage snapshots.Usage) Record {
	return Record{
		Name:    info.Name,
		ID:      id,
		Kind:    Kind(info.Kind),
		Parent:  info.Parent,
		Labels:  info.Labels,
		Created: info.Created,
		Updated: info.Updated,
		Usage:   Usage{Size: usage.Size, Inodes: usage.Inodes},
	}
}

// validate checks a record read from an export.
func (r Record) validate() error {
	if r.Name == "" {
		return fmt.Errorf("no name")
	}
	id, err := strconv.ParseUint(r.ID, 10, 64)
	if err != nil || id == 0 {
		return fmt.Errorf("snapshot %q: id %q is not a positive decimal number", r.Name, r.ID)
	}
	if r.Parent == r.Name {
		return fmt.Errorf("snapshot %q is its own parent", r.Name)
	}
	for k := range r.Labels {
		if k == "" {
			return fmt.Errorf("snapshot %q: label with an empty key", r.Name)
		}
	}
	if r.Created.IsZero() || r.Updated.IsZero() {
		return fmt.Errorf("snapshot %q: created and updated times are required", r.Name)
	}
	return nil
}

// diff describes how two records of the same snapshot differ, or returns ""
// when they are identical.
func diff(want, got Record) string {
	var d []string
	add := func(field string, w, g any) {
		d = append(d, fmt.Sprintf("%s %v != %v", field, w, g))
	}
	if want.Name != got.Name {
		add("name", strconv.Quote(want.Name), strconv.Quote(got.Name))
	}
	if want.ID != got.ID {
		add("id", want.ID, got.ID)
	}
	if want.Kind != got.Kind {
		add("kind", want.Kind, got.Kind)
	}
	if want.Parent != got.Parent {
		add("parent", strconv.Quote(want.Parent), strconv.Quote(got.Parent))
	}
	if !maps.Equal(cleanLabels(want.Labels), cleanLabels(got.Labels)) {
		add("labels", fmtLabels(want.Labels), fmtLabels(got.Labels))
	}
	if !want.Created.Equal(got.Created) {
		add("created", fmtTimeNano(want.Created), fmtTimeNano(got.Created))
	}
	if !want.Updated.Equal(got.Updated) {
		add("updated", fmtTimeNano(want.Updated), fmtTimeNano(got.Updated))
	}
	if want.Host != got.Host {
		add("host", strconv.Quote(want.Host), strconv.Quote(got.Host))
	}
	if want.Content != got.Content {
		add("content", strconv.Quote(want.Content), strconv.Quote(got.Content))
	}
	if want.Usage != got.Usage {
		add("usage", fmt.Sprintf("%d bytes/%d inodes", want.Usage.Size, want.Usage.Inodes), fmt.Sprintf("%d bytes/%d inodes", got.Usage.Size, got.Usage.Inodes))
	}
	return strings.Join(d, ", ")
}

// cleanLabels drops empty values, which the stores treat as absent.
func cleanLabels(l map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range l {
		if v != "" {
			out[k] = v
		}
	}
	return out
}

func fmtLabels(l map[string]string) string {
	keys := slices.Sorted(maps.Keys(l))
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + l[k]
	}
	return "{" + strings.Join(parts, ",") + "}"
}

func fmtTimeNano(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

// loadAll reads every snapshot matching filters (all without filters) in one
// read-only transaction, in name order, with storage.Walk: on etcd one round
// trip per page of records, on bbolt one cursor pass. Records that cannot be
// read do not stop it: they are returned in bad, the others in recs. prog
// (nil for none) counts the records read.
func loadAll(ctx context.Context, ms storage.MetaStore, prog *progress, filters ...string) (recs []Record, bad []storage.CorruptRecord, err error) {
	err = ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		recs, bad = recs[:0], nil
		err := storage.Walk(ctx, func(r storage.Record) error {
			recs = append(recs, fromStorage(r))
			prog.add(1)
			return nil
		}, filters...)
		var ce *storage.CorruptRecordsError
		if errors.As(err, &ce) {
			bad = ce.Records
			return nil
		}
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	return recs, bad, nil
}

// loadReadableIn is loadAll for the listing commands, of host's scope
// ("" for a store without host scopes): it reports each record that cannot
// be read on stderr, its name qualified by the host, and returns, with the
// readable records, leftOut: the error the command ends with once it has
// written them (exit code 1; nil when every record was read). prog (nil
// for none) counts the records read.
func (a *app) loadReadableIn(ctx context.Context, ms storage.MetaStore, host string, prog *progress, filters ...string) (recs []Record, leftOut, err error) {
	recs, bad, err := loadAll(ctx, ms, prog, filters...)
	if err != nil {
		return nil, nil, err
	}
	if len(bad) == 0 {
		return recs, nil, nil
	}
	for _, b := range bad {
		fmt.Fprintf(a.stderr, "snapmeta: snapshot %q cannot be read: %s\n", qualify(host, b.Name), sayClassOnce(oneLine(b.Err.Error())))
	}
	return recs, &exitError{code: 1, err: fmt.Errorf("%d snapshot(s) cannot be read and are left out (see 'snapmeta check')", len(bad))}, nil
}

// loadEvery is loadAll for commands that need every record (migrate, demo):
// a record that cannot be read is an error. prog (nil for none) counts the
// records read.
func loadEvery(ctx context.Context, ms storage.MetaStore, prog *progress) ([]Record, error) {
	recs, bad, err := loadAll(ctx, ms, prog)
	if err == nil && len(bad) > 0 {
		err = &storage.CorruptRecordsError{Records: bad}
	}
	return recs, err
}

// fromStorage converts a record of the library.
func fromStorage(r storage.Record) Record {
	return Record{
		Name:    r.Name,
		ID:      r.ID,
		Kind:    Kind(r.Kind),
		Parent:  r.Parent,
		Labels:  r.Labels,
		Created: r.Created,
		Updated: r.Updated,
		Usage:   Usage{Size: r.Usage.Size, Inodes: r.Usage.Inodes},
		Host:    r.Host,
		Content: r.Content,
	}
}

// node is a snapshot in the parent forest.
type node struct {
	Record
	children []*node
	// orphan is set on a root whose parent is not in the store.
	orphan bool
}

// forest arranges records (in name order) by parent: roots are snapshots
// without a parent, or whose parent is missing (orphans). Records caught in
// a parent loop, which only a damaged store has, are returned in loops.
func forest(recs []Record) (roots []*node, loops []Record) {
	nodes := make(map[string]*node, len(recs))
	for _, r := range recs {
		nodes[r.Name] = &node{Record: r}
	}
	for _, r := range recs {
		n := nodes[r.Name]
		if r.Parent == "" {
			roots = append(roots, n)
			continue
		}
		p, ok := nodes[r.Parent]
		if !ok {
			n.orphan = true
			roots = append(roots, n)
			continue
		}
		p.children = append(p.children, n)
	}
	seen := map[string]bool{}
	var visit func(n *node)
	visit = func(n *node) {
		seen[n.Name] = true
		for _, c := range n.children {
			visit(c)
		}
	}
	for _, r := range roots {
		visit(r)
	}
	for _, r := range recs {
		if !seen[r.Name] {
			loops = append(loops, r)
		}
	}
	return roots, loops
}

// parentFirst orders records so that every parent comes before its
// children: depth first from each root, siblings in name order. orphans
// names the records whose parent is missing (they come in order too, after
// nothing); records in a parent loop come last.
func parentFirst(recs []Record) (ordered []Record, orphans, loops []string) {
	roots, loopRecs := forest(recs)
	var walk func(n *node)
	walk = func(n *node) {
		ordered = append(ordered, n.Record)
		for _, c := range n.children {
			walk(c)
		}
	}
	for _, r := range roots {
		if r.orphan {
			orphans = append(orphans, r.Name)
		}
		walk(r)
	}
	for _, r := range loopRecs {
		ordered = append(ordered, r)
		loops = append(loops, r.Name)
	}
	return ordered, orphans, loops
}

// isNotFound reports a missing snapshot.
func isNotFound(err error) bool { return errdefs.IsNotFound(err) }
