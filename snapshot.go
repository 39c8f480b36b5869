package storage

import (
	"context"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/filters"
	clabels "github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
)

// Snapshot is the metadata a driver needs to mount an active or view
// snapshot: its kind, its ID (which names its directory) and the IDs of the
// committed snapshots it is based on. ParentIDs lists the immediate parent
// first and the base last, exactly as containerd's store does.
type Snapshot struct {
	Kind      snapshots.Kind
	ID        string
	ParentIDs []string
}

// record is one stored snapshot, as the rules see it on every engine.
type record struct {
	ID     uint64
	Kind   snapshots.Kind
	Parent string
	// ParentIDs is the chain of parent IDs, immediate parent first. It is
	// empty when Parent is empty, and may be empty for a record written by
	// containerd's store, in which case the chain is followed instead.
	ParentIDs []uint64
	// Labels is nil when the snapshot has none; no value is empty.
	Labels  map[string]string
	Created time.Time
	Updated time.Time
	// Usage is only kept for committed snapshots.
	Usage snapshots.Usage
	// ChainFrom, when set, says ParentIDs holds only the head of the
	// chain, which goes on with the chain of the snapshot of that name
	// (bbolt stores long chains in pieces: bolt_chain.go). Only scan hands
	// out such records; get and getMany return whole chains.
	ChainFrom string
	// Content is the content key of a committed snapshot that is a binding
	// of a shared layer (see share.go), empty otherwise. It is identity:
	// it never changes while the record lives. Only etcd stores it.
	Content string
}

// ref names a snapshot both ways, so each engine can key its children index
// as it prefers.
type ref struct {
	name string
	id   uint64
}

// engineTx is all an engine does for the rules: store records and the
// children index. It never checks a snapshot rule; the rules never know which
// engine they run on.
type engineTx interface {
	// get returns the record stored under name, nil when there is none.
	get(ctx context.Context, name string) (*record, error)
	// getMany returns the records stored under names, nil for an absent
	// one; engines may answer all of them in one round trip. Only their
	// identity is promised (ID, Kind, Parent, ParentIDs): labels, times and
	// usage may be left out, as the rules that look up several names never
	// use them.
	getMany(ctx context.Context, names lookupNames) ([maxLookup]*record, error)
	// put stores r under name, replacing any record there.
	put(name string, r *record) error
	// delete removes the record stored under name.
	delete(name string) error
	// link and unlink add and drop the index entry "child has parent".
	link(parent, child ref) error
	unlink(parent, child ref) error
	// hasChildren reports whether any index entry has parent p.
	hasChildren(ctx context.Context, p ref) (bool, error)
	// willCheckChildren announces that hasChildren of name will follow
	// its get, so an engine may read both in one round trip.
	willCheckChildren(name string)
	// maxName is the longest name the engine can hold and answer for
	// within its limits; the rules look up no longer name.
	maxName() int
	// scan calls fn for every stored snapshot in name order, with its record
	// or the error decoding it, and stops at fn's first error. fn may write
	// in the transaction: each name is reported as the transaction holds it
	// when the scan reaches it, so a name written ahead of the scan is
	// reported with its new record, one deleted ahead of it is not, and one
	// written behind it is not. r is fn's during the call only (an engine
	// may decode every record into the same one); its Labels are fn's to
	// keep.
	scan(ctx context.Context, fn func(name string, r *record, decodeErr error) error) error
	// layoutDamage reports damage to the engine's layout outside any
	// record (a plain key where the layout has a bucket, say), nil when it
	// is sound. Operations that need the damaged part fail with it
	// (ErrCorrupt); Check reports it.
	layoutDamage() error
	// scanLinks calls fn for every children-index entry; each engine fills
	// in the parts of parent it keys the index by (bbolt the ID, etcd the
	// name). An entry whose key is not exactly the one link writes is no
	// link: fn gets the error (ErrCorrupt) and the child name it holds. It
	// is for Check.
	scanLinks(ctx context.Context, fn func(parent, child ref, err error) error) error
	// checkReader reads for Check.
	checkReader
	// idLimit returns the highest ID the allocator may have handed out,
	// 2^64-1 once it may have handed out every ID.
	idLimit(ctx context.Context) (uint64, error)
	// nextID returns an ID never handed out before in this store, or,
	// after 2^64-1, ErrIDsExhausted with the transaction left as it was:
	// IDs never wrap.
	nextID(ctx context.Context) (uint64, error)
	// raiseIDs makes sure nextID never returns id or below, for the rest
	// of the transaction and, once it commits, on every client of the store
	// (for imports).
	raiseIDs(ctx context.Context, id uint64) error
	// commit applies every write at once or none; rollback drops them.
	commit(ctx context.Context) error
	rollback() error
}

// info hands r's labels over: records are decoded afresh for every read,
// and no engine keeps them.
func (r *record) info(name string) snapshots.Info {
	return snapshots.Info{
		Kind:    r.Kind,
		Name:    name,
		Parent:  r.Parent,
		Labels:  r.Labels,
		Created: r.Created,
		Updated: r.Updated,
	}
}

func formatID(id uint64) string { return strconv.FormatUint(id, 10) }

func kindName(k snapshots.Kind) string {
	switch k {
	case snapshots.KindActive, snapshots.KindView, snapshots.KindCommitted:
		return k.String()
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// cleanLabels returns labels without empty values (an empty value means "no
// such label", as in containerd) and nil rather than an empty map, and
// refuses labels containerd would refuse.
func cleanLabels(labels map[string]string) (map[string]string, error) {
	var out map[string]string
	for k, v := range labels {
		if v == "" {
			continue
		}
		if k == "" {
			return nil, fmt.Errorf("label with empty key: %w", errdefs.ErrInvalidArgument)
		}
		// containerd's own bound (key and value at most 4096 bytes): a
		// driver behind containerd never sees more.
		if err := clabels.Validate(k, v); err != nil {
			return nil, err
		}
		if out == nil {
			out = make(map[string]string, len(labels))
		}
		out[k] = v
	}
	return out, nil
}

// MaxNameSize is the longest name, in bytes, this package gives a new
// snapshot (CreateSnapshot, CommitActive's new name, Import): a longer one is
// refused with InvalidArgument. containerd's own keys are far shorter; the
// bound keeps every record written within what both engines store (bbolt
// keys end at 32 KiB, etcd requests at 1.5 MiB).
//
// Lookups (GetInfo, GetSnapshot, UpdateInfo, Remove, CommitActive's key,
// parents) are not bound by it: they reach every name the engine can hold,
// so a snapshot containerd's store made under a longer name (its bound is
// bbolt's 32 KiB key limit) is read, updated, used as a parent, committed
// and removed like any other. A name longer than the engine holds (bbolt:
// 32 KiB; etcd: 64 KiB, which keeps a removal within etcd's default request
// limit) is absent without a request. Every name WalkInfo and IDMap return
// can be looked up: a record stored under a name no lookup reaches (empty,
// or longer) ends them with ErrCorrupt, and Check reports it.
const MaxNameSize = 4096

// unreachableName says why no lookup reaches a record stored under name
// (ErrCorrupt), given the engine's maxName; nil when one does.
func unreachableName(name string, maxName int) error {
	switch {
	case name == "":
		return fmt.Errorf("stored under the empty name (a name must not be empty): %w", ErrCorrupt)
	case len(name) > maxName:
		return fmt.Errorf("stored under a name of %d bytes, longer than the %d the engine looks up: %w", len(name), maxName, ErrCorrupt)
	}
	return nil
}

func checkName(what, name string) error {
	if name == "" {
		return fmt.Errorf("%s name must not be empty: %w", what, errdefs.ErrInvalidArgument)
	}
	if len(name) > MaxNameSize {
		return fmt.Errorf("%s name of %d bytes is longer than %d: %w", what, len(name), MaxNameSize, errdefs.ErrInvalidArgument)
	}
	return nil
}

// applyOpts applies opts to an empty Info and cleans its labels.
func applyOpts(opts []snapshots.Opt) (snapshots.Info, error) {
	if len(opts) == 0 {
		return snapshots.Info{}, nil // and no Info to allocate: the options make it escape
	}
	base := new(snapshots.Info)
	for _, opt := range opts {
		if err := opt(base); err != nil {
			return snapshots.Info{}, err
		}
	}
	labels, err := cleanLabels(base.Labels)
	base.Labels = labels
	return *base, err
}

// walkRecords calls fn for every record in name order; a record that does
// not decode, or that no lookup reaches, ends the walk with its error: a
// listing names only snapshots that can be read and removed.
func walkRecords(ctx context.Context, tx engineTx, fn func(name string, r *record) error) error {
	return tx.scan(ctx, func(name string, r *record, err error) error {
		if err == nil {
			err = unreachableName(name, tx.maxName())
		}
		if err != nil {
			return fmt.Errorf("snapshot %q: %w", name, err)
		}
		return fn(name, r)
	})
}

// getOne returns the record of name, or a NotFound error. A name no
// snapshot can have (empty, or longer than the engine holds) is absent
// without asking the engine.
func getOne(ctx context.Context, tx engineTx, name string) (*record, error) {
	var r *record
	if name != "" && len(name) <= tx.maxName() {
		var err error
		if r, err = tx.get(ctx, name); err != nil {
			return nil, err
		}
	}
	if r == nil {
		return nil, fmt.Errorf("snapshot %q does not exist: %w", name, errdefs.ErrNotFound)
	}
	return r, nil
}

// identityOf returns the identity of name's record (ID, kind, parent and
// chain; see getMany), or a NotFound error. Rules that need no more than
// identity read through it, so that on etcd they do not conflict with a
// concurrent change of labels or usage, which leaves their answer as it was.
func identityOf(ctx context.Context, tx engineTx, name string) (*record, error) {
	rs, err := lookup(ctx, tx, name)
	if err != nil {
		return nil, err
	}
	if rs[0] == nil {
		return nil, fmt.Errorf("snapshot %q does not exist: %w", name, errdefs.ErrNotFound)
	}
	return rs[0], nil
}

// chainOf returns the parent ID chain of a snapshot whose immediate parent is
// p (immediate parent first), using the stored chain when there is one.
func chainOf(ctx context.Context, tx engineTx, p *record) ([]uint64, error) {
	chain := make([]uint64, 1, 1+len(p.ParentIDs))
	chain[0] = p.ID
	var visited map[string]bool // only records without a stored chain are followed
	for p.Parent != "" {
		if len(p.ParentIDs) > 0 {
			return append(chain, p.ParentIDs...), nil
		}
		if visited[p.Parent] {
			return nil, fmt.Errorf("parent chain loops at %q: %w", p.Parent, ErrCorrupt)
		}
		if visited == nil {
			visited = map[string]bool{}
		}
		visited[p.Parent] = true
		next, err := identityOf(ctx, tx, p.Parent)
		if err != nil {
			return nil, fmt.Errorf("parent chain: %w", err)
		}
		p = next
		chain = append(chain, p.ID)
	}
	return chain, nil
}

// lookup reads the identity of the records of names (see getMany), nil for
// an absent one; a name no snapshot can have (empty, or longer than the
// engine holds) is absent without asking the engine.
func lookup(ctx context.Context, tx engineTx, names ...string) ([maxLookup]*record, error) {
	var set lookupNames
	for i, name := range names {
		if len(name) <= tx.maxName() {
			set[i] = name
		}
	}
	return tx.getMany(ctx, set)
}

// maxLookup is the most names one lookup reads (CommitActive's three). A
// fixed array keeps lookups free of allocations.
const maxLookup = 3

// lookupNames are the names of one lookup; empty ones are not read.
type lookupNames [maxLookup]string

// recordChain returns r's parent chain, following parents when r does not
// store it.
func recordChain(ctx context.Context, tx engineTx, r *record) ([]uint64, error) {
	if r.Parent == "" || len(r.ParentIDs) > 0 {
		return r.ParentIDs, nil
	}
	p, err := identityOf(ctx, tx, r.Parent)
	if err != nil {
		return nil, fmt.Errorf("parent: %w", err)
	}
	return chainOf(ctx, tx, p)
}

func formatIDs(ids []uint64) []string {
	if len(ids) == 0 {
		return nil
	}
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = formatID(id)
	}
	return out
}

func (t *transaction) GetInfo(ctx context.Context, key string) (string, snapshots.Info, snapshots.Usage, error) {
	// The callback keeps the record only: each variable it sets is an
	// allocation of its own.
	var r *record
	err := t.use(ctx, false, func(tx engineTx) (err error) {
		r, err = getOne(ctx, tx, key)
		return err
	})
	if err != nil {
		return "", snapshots.Info{}, snapshots.Usage{}, err
	}
	return formatID(r.ID), r.info(key), r.Usage, nil
}

// updatedLabels applies fieldpaths to current as containerd does: no path
// replaces all labels, "labels" replaces all, "labels.<key>" sets or (with an
// empty or missing value) removes one.
func updatedLabels(current map[string]string, info snapshots.Info, fieldpaths []string) (map[string]string, error) {
	if len(fieldpaths) == 0 {
		return cleanLabels(info.Labels)
	}
	labels := maps.Clone(current)
	if labels == nil {
		labels = map[string]string{}
	}
	for _, path := range fieldpaths {
		if key, ok := strings.CutPrefix(path, "labels."); ok {
			labels[key] = info.Labels[key]
			continue
		}
		if path != "labels" {
			return nil, fmt.Errorf("cannot update %q field on snapshot %q: %w", path, info.Name, errdefs.ErrInvalidArgument)
		}
		labels = maps.Clone(info.Labels)
		if labels == nil {
			labels = map[string]string{}
		}
	}
	return cleanLabels(labels)
}

func (t *transaction) UpdateInfo(ctx context.Context, info snapshots.Info, fieldpaths ...string) (updated snapshots.Info, err error) {
	err = t.use(ctx, true, func(tx engineTx) error {
		r, err := getOne(ctx, tx, info.Name)
		if err != nil {
			return err
		}
		labels, err := updatedLabels(r.Labels, info, fieldpaths)
		if err != nil {
			return err
		}
		r.Labels = labels
		r.Updated = time.Now().UTC()
		if err := tx.put(info.Name, r); err != nil {
			return err
		}
		updated = r.info(info.Name)
		return nil
	})
	if err != nil {
		return snapshots.Info{}, err
	}
	return updated, nil
}

func (t *transaction) WalkInfo(ctx context.Context, fn snapshots.WalkFunc, fs ...string) error {
	if err := t.ready(ctx, false); err != nil {
		return err
	}
	filter, err := parseFilters(fs...)
	if err != nil {
		return err
	}
	var fields infoFields
	return t.use(ctx, false, func(tx engineTx) error {
		return walkRecords(ctx, tx, func(name string, r *record) error {
			fields.info = r.info(name)
			if !filter.Match(&fields) {
				return nil
			}
			if err := fn(ctx, fields.info); err != nil {
				return callerError{err}
			}
			// A callback may end the transaction; the engine cannot go on.
			if t.done.Load() {
				return ErrTransactionDone
			}
			return nil
		})
	})
}

// infoFields exposes the fields containerd's snapshot filters know, of one
// snapshots.Info at a time: a walk matches every record through one
// infoFields, so that matching allocates nothing.
type infoFields struct{ info snapshots.Info }

var _ filters.Adaptor = (*infoFields)(nil)

func (a *infoFields) Field(fieldpath []string) (string, bool) {
	if len(fieldpath) == 0 {
		return "", false
	}
	info := &a.info
	switch fieldpath[0] {
	case "kind":
		switch info.Kind {
		case snapshots.KindActive:
			return "active", true
		case snapshots.KindView:
			return "view", true
		case snapshots.KindCommitted:
			return "committed", true
		}
	case "name":
		return info.Name, true
	case "parent":
		return info.Parent, true
	case "labels":
		v, ok := info.Labels[strings.Join(fieldpath[1:], ".")]
		return v, ok
	}
	return "", false
}

func (t *transaction) GetSnapshot(ctx context.Context, key string) (s Snapshot, err error) {
	err = t.use(ctx, false, func(tx engineTx) error {
		r, err := identityOf(ctx, tx, key)
		if err != nil {
			return err
		}
		if r.Kind != snapshots.KindActive && r.Kind != snapshots.KindView {
			return fmt.Errorf("requested snapshot %q not active or view: %w", key, errdefs.ErrFailedPrecondition)
		}
		chain, err := recordChain(ctx, tx, r)
		if err != nil {
			return fmt.Errorf("failed to get parent chain of %q: %w", key, err)
		}
		s = Snapshot{Kind: r.Kind, ID: formatID(r.ID), ParentIDs: formatIDs(chain)}
		return nil
	})
	if err != nil {
		return Snapshot{}, err
	}
	return s, nil
}

// newParentChain checks that parent (whose record is p, nil when absent)
// may have a new child, and returns the child's parent chain; no parent
// means no chain.
func newParentChain(ctx context.Context, tx engineTx, parent string, p *record) ([]uint64, error) {
	switch {
	case parent == "":
		return nil, nil
	case p == nil:
		return nil, fmt.Errorf("missing parent %q: %w", parent, errdefs.ErrNotFound)
	case p.Kind != snapshots.KindCommitted:
		return nil, fmt.Errorf("parent %q is not committed snapshot: %w", parent, errdefs.ErrInvalidArgument)
	}
	return chainOf(ctx, tx, p)
}

// putNew stores the record of a new snapshot and its link to its parent,
// whose ID heads r's chain.
func putNew(tx engineTx, name string, r *record) error {
	if err := tx.put(name, r); err != nil {
		return err
	}
	if r.Parent == "" {
		return nil
	}
	if err := tx.link(ref{r.Parent, r.ParentIDs[0]}, ref{name, r.ID}); err != nil {
		return fmt.Errorf("failed to write parent link for snapshot %q: %w", name, err)
	}
	return nil
}

func (t *transaction) CreateSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts ...snapshots.Opt) (s Snapshot, err error) {
	err = t.use(ctx, true, func(tx engineTx) error {
		if kind != snapshots.KindActive && kind != snapshots.KindView {
			return fmt.Errorf("snapshot type %s invalid; only snapshots of type Active or View can be created: %w", kindName(kind), errdefs.ErrInvalidArgument)
		}
		if err := checkName("snapshot", key); err != nil {
			return err
		}
		base, err := applyOpts(opts)
		if err != nil {
			return err
		}
		// One lookup for both names lets an engine answer in one round trip.
		rs, err := lookup(ctx, tx, key, parent)
		if err != nil {
			return err
		}
		existing, p := rs[0], rs[1]
		chain, err := newParentChain(ctx, tx, parent, p)
		if err != nil {
			return err
		}
		if existing != nil {
			return fmt.Errorf("snapshot %q: %w", key, errdefs.ErrAlreadyExists)
		}
		id, err := tx.nextID(ctx)
		if err != nil {
			return fmt.Errorf("unable to get identifier for snapshot %q: %w", key, err)
		}
		now := time.Now().UTC()
		r := &record{ID: id, Kind: kind, Parent: parent, ParentIDs: chain, Labels: base.Labels, Created: now, Updated: now}
		if err := putNew(tx, key, r); err != nil {
			return err
		}
		s = Snapshot{Kind: kind, ID: formatID(id), ParentIDs: formatIDs(chain)}
		return nil
	})
	if err != nil {
		return Snapshot{}, err
	}
	return s, nil
}

func (t *transaction) Remove(ctx context.Context, key string) (id string, kind snapshots.Kind, err error) {
	err = t.use(ctx, true, func(tx engineTx) error {
		r, err := remove(ctx, tx, key, false)
		if err != nil {
			return err
		}
		id, kind = formatID(r.ID), r.Kind
		return nil
	})
	if err != nil {
		return "", 0, err
	}
	return id, kind, nil
}

// removed is the record of a removed snapshot, and whether its data may go
// (see Release).
type removed struct {
	*record
	last bool
}

// remove removes key and its parent link. A binding of a shared layer
// drops its reference (see dropBinding); release lets it go while other
// bindings remain.
func remove(ctx context.Context, tx engineTx, key string, release bool) (removed, error) {
	tx.willCheckChildren(key)
	r, err := identityOf(ctx, tx, key)
	if err != nil {
		return removed{}, err
	}
	busy, err := tx.hasChildren(ctx, ref{key, r.ID})
	if err != nil {
		return removed{}, err
	}
	if busy {
		return removed{}, fmt.Errorf("cannot remove snapshot %q with child: %w", key, errdefs.ErrFailedPrecondition)
	}
	last := true
	if r.Content != "" {
		if last, err = dropBinding(ctx, tx, key, r, release); err != nil {
			return removed{}, err
		}
	}
	if r.Parent != "" {
		pid, err := parentID(ctx, tx, r)
		if err != nil {
			return removed{}, err
		}
		if err := tx.unlink(ref{r.Parent, pid}, ref{key, r.ID}); err != nil {
			return removed{}, fmt.Errorf("failed to delete parent link: %w", err)
		}
	}
	if err := tx.delete(key); err != nil {
		return removed{}, fmt.Errorf("failed to delete snapshot %q: %w", key, err)
	}
	return removed{r, last}, nil
}

// parentID returns the ID of r's parent, from the stored chain when there is
// one (a parent cannot change while it has children).
func parentID(ctx context.Context, tx engineTx, r *record) (uint64, error) {
	if len(r.ParentIDs) > 0 {
		return r.ParentIDs[0], nil
	}
	p, err := identityOf(ctx, tx, r.Parent)
	if err != nil {
		return 0, fmt.Errorf("parent: %w", err)
	}
	return p.ID, nil
}

func (t *transaction) CommitActive(ctx context.Context, key, name string, usage snapshots.Usage, opts ...snapshots.Opt) (id string, err error) {
	err = t.use(ctx, true, func(tx engineTx) error {
		r, err := commitActive(ctx, tx, key, name, usage, "", opts)
		if err != nil {
			return err
		}
		id = formatID(r.ID)
		return nil
	})
	if err != nil {
		return "", err
	}
	return id, nil
}

// commitActive commits the active key as name and returns the committed
// record; content is the content key of a shared layer (see CommitShared),
// empty for none.
func commitActive(ctx context.Context, tx engineTx, key, name string, usage snapshots.Usage, content string, opts []snapshots.Opt) (*record, error) {
	if err := checkName("committed snapshot", name); err != nil {
		return nil, err
	}
	base, err := applyOpts(opts)
	if err != nil {
		return nil, err
	}
	rs, err := lookup(ctx, tx, name, key, base.Parent)
	if err != nil {
		return nil, err
	}
	taken, r, rebaseOnto := rs[0], rs[1], rs[2]
	if taken != nil {
		return nil, fmt.Errorf("committed snapshot %q: %w", name, errdefs.ErrAlreadyExists)
	}
	if r == nil {
		return nil, fmt.Errorf("failed to get active snapshot %q: %w", key, errdefs.ErrNotFound)
	}
	if r.Kind != snapshots.KindActive {
		return nil, fmt.Errorf("snapshot %q is not active: %w", key, errdefs.ErrFailedPrecondition)
	}

	committed := *r
	committed.Kind = snapshots.KindCommitted
	committed.Created = time.Now().UTC()
	committed.Updated = committed.Created
	committed.Labels = base.Labels // replaced, not inherited
	committed.Usage = usage
	committed.Content = content

	var pid uint64
	switch {
	case r.Parent == base.Parent || base.Parent == "":
		// The parent stays; it is committed and cannot have gone while
		// this active was its child.
		if r.Parent != "" {
			if pid, err = parentID(ctx, tx, r); err != nil {
				return nil, err
			}
		}
	case r.Parent == "":
		// An active created without a parent may be rebased on commit.
		if rebaseOnto == nil {
			return nil, fmt.Errorf("missing parent %q of snapshot %q: %w", base.Parent, key, errdefs.ErrNotFound)
		}
		if rebaseOnto.Kind != snapshots.KindCommitted {
			return nil, fmt.Errorf("parent %q is not committed: %w", base.Parent, errdefs.ErrFailedPrecondition)
		}
		committed.Parent = base.Parent
		if committed.ParentIDs, err = chainOf(ctx, tx, rebaseOnto); err != nil {
			return nil, err
		}
		pid = rebaseOnto.ID
	default:
		return nil, fmt.Errorf("cannot change parent of active snapshot %q on commit: %w", key, errdefs.ErrInvalidArgument)
	}

	if err := tx.delete(key); err != nil {
		return nil, fmt.Errorf("failed to delete active snapshot %q: %w", key, err)
	}
	if err := tx.put(name, &committed); err != nil {
		return nil, err
	}
	if committed.Parent != "" {
		// The link is keyed by the IDs, which stay: linking again
		// renames the child in place.
		if err := tx.link(ref{committed.Parent, pid}, ref{name, r.ID}); err != nil {
			return nil, fmt.Errorf("failed to update parent link of %q: %w", name, err)
		}
	}
	return &committed, nil
}

func (t *transaction) IDMap(ctx context.Context) (map[string]string, error) {
	m := map[string]string{}
	err := t.use(ctx, false, func(tx engineTx) error {
		return walkRecords(ctx, tx, func(name string, r *record) error {
			m[formatID(r.ID)] = name
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return m, nil
}
