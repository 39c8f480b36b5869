// Package overlaysnap is a reference overlayfs snapshotter built on
// github.com/snapmeta/storage: it keeps each snapshot's files in a directory
// of its own under a root directory, returns overlayfs (or bind) mounts that
// stack a snapshot on its parents, and keeps all of its metadata in a
// storage.MetaStore, so that one argument to New chooses bbolt or etcd.
//
// Every metadata call goes through the package-level drop-in functions
// (storage.CreateSnapshot, storage.GetInfo, ...) on the transaction that
// MetaStore.WithTransaction puts in the context, as containerd's own drivers
// use containerd's store. examples/nativesnap is the copy-based sibling;
// docs/porting.md explains the port.
//
// Layout on disk:
//
//	<root>/snapshots/<id>/fs     the snapshot's files: the upper directory of an active
//	<root>/snapshots/<id>/work   overlayfs's work directory (actives only)
//	<root>/snapshots/new-*       a directory being prepared (not yet published)
//	<root>/snapshots/rm-*        a directory being removed
//
// Every snapshot has a directory named by its ID, so that Cleanup can tell
// garbage from live data by the IDs alone.
//
// # Mounts
//
// The mounts follow containerd's overlayfs snapshotter. Parents are listed
// by storage.Snapshot.ParentIDs, immediate parent first, which is the order
// overlayfs wants for lowerdir (the leftmost layer is on top):
//
//   - an active snapshot without a parent is a read-write bind mount of its
//     fs directory;
//   - an active snapshot with parents is an overlay mount,
//     lowerdir=<parents' fs>,upperdir=<fs>,workdir=<work>;
//   - a view without a parent is a read-only bind mount of its own (empty)
//     fs directory;
//   - a view of one parent is a read-only bind mount of the parent's fs
//     directory (overlayfs needs two layers at least when it has no upper
//     directory);
//   - a view of several parents is a read-only overlay mount with only
//     lowerdir.
//
// Committed snapshots have no mounts; their fs directories serve as lower
// directories of their children. Renaming a directory that lives in a lower
// layer fails with EXDEV unless the overlay is mounted with redirect_dir=on
// (see the kernel's overlayfs documentation); WithMountOptions can add it.
//
// # Transactions that run again
//
// On etcd, WithTransaction runs its callback again when the commit lost a
// race, in a new transaction that may hand out a new ID. The filesystem work
// is therefore kept idempotent: Prepare and View build the new directory
// under a temporary name before any transaction, publish it under its ID
// inside the callback (moving it back first when a previous attempt
// published it under another ID), and remove it when the transaction
// finally fails. Commit measures disk usage once per ID; Remove deletes
// files only after the metadata transaction has committed.
//
// bbolt hands out again an ID whose transaction never committed. A directory
// already named by the ID a Prepare has just been given is therefore
// garbage (a process killed between publishing and committing leaves one),
// and Prepare replaces it.
//
// # Host scopes: layers shared between containerd daemons
//
// On an etcd store opened in a host scope (storage.WithHost), with the
// same root directory on every host (a shared file system), the
// snapshotter shares committed layers between hosts through containerd's
// remote-snapshot protocol, as examples/nativesnap does:
//
//   - Commit of an active snapshot whose labels carry
//     containerd.io/snapshot.ref (containerd's unpacker sets it to the
//     layer's chain ID) commits it with storage.CommitShared, indexed by
//     that chain ID.
//   - Prepare (or View) with that label, when a layer with that chain ID is
//     committed in the root on the same parent layer, binds the layer into
//     this host's scope with storage.BindLayer under the name key and
//     returns an AlreadyExists error: containerd then looks the layer up by
//     its label and parent (Walk) and skips the unpack. The binding takes
//     the name key because containerd made it unique in the scope (its
//     "<namespace>/<counter>/<key>"), whereas the chain ID may be bound
//     already in another namespace of the same daemon; containerd takes
//     whatever name its Walk finds.
//   - Remove releases the name with storage.Release, and deletes the
//     directory only when no other binding, in any scope, still uses it.
//   - Every active snapshot records its upper directory in the label
//     storage.KeyUpperdir (as WithUpperdirLabel does), so that another
//     host taking it over (storage.TakeOver) knows where its changes are.
//   - Cleanup removes nothing: the store shows only this host's snapshots,
//     so a directory that no ID of this scope names may well be another
//     host's (see Cleanup).
//
// Without host scopes (bbolt, or an etcd store opened without a host) none
// of this happens: the label is an ordinary label.
package overlaysnap

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/snapmeta/storage"
)

// UpperdirLabel is the label that, with WithUpperdirLabel, records on each
// active snapshot the absolute path of its writable (upper) directory. It is
// the convention by which other hosts sharing an etcd store find where an
// active snapshot's changes live.
const UpperdirLabel = storage.KeyUpperdir

// Opt configures a snapshotter made by New.
type Opt func(*config) error

type config struct {
	upperdirLabel bool
	mountOptions  []string
}

// WithUpperdirLabel makes Prepare record UpperdirLabel on every active
// snapshot it creates, in the transaction that creates it, and makes Update
// keep that label on active snapshots: an update that would remove or change
// it leaves it as it was. Committed snapshots and views never carry it.
//
// The label names a directory whose ID is known only once CreateSnapshot has
// allocated it, so it is written by a second update of the new record in the
// same transaction: an active snapshot's Updated time is then a little later
// than its Created time. containerd's snapshotter suite requires the two to
// be equal for a new snapshot, and an update of all labels to leave exactly
// the labels given; this is why the label is an option, off by default (as
// in containerd's overlayfs snapshotter, whose label is only added to what
// Stat, Update and Walk return, and not stored). On a host-scoped store it
// is on whatever the options say: another host taking an active snapshot
// over needs it.
func WithUpperdirLabel() Opt {
	return func(c *config) error {
		c.upperdirLabel = true
		return nil
	}
}

// WithMountOptions adds options to every overlay mount the snapshotter
// returns, before its lowerdir, upperdir and workdir options (for example
// "index=off", "redirect_dir=on", "userxattr"). Bind mounts are unaffected.
// An option that names a directory (lowerdir=, upperdir=, workdir=) is
// refused with InvalidArgument.
func WithMountOptions(options ...string) Opt {
	return func(c *config) error {
		for _, o := range options {
			for _, reserved := range []string{"lowerdir=", "upperdir=", "workdir="} {
				if strings.HasPrefix(o, reserved) {
					return fmt.Errorf("mount option %q is set by the snapshotter: %w", o, errdefs.ErrInvalidArgument)
				}
			}
		}
		c.mountOptions = append(c.mountOptions, options...)
		return nil
	}
}

// snapshotter is an overlayfs snapshots.Snapshotter, and a
// snapshots.Cleaner.
type snapshotter struct {
	root string
	ms   storage.MetaStore
	cfg  config
	// scoped: ms is host-scoped (see the package documentation).
	scoped bool

	// fsMu keeps Cleanup away from directories being created or removed:
	// Prepare, View and Remove hold it for reading, Cleanup for writing.
	fsMu sync.RWMutex

	// pending holds the IDs under which a Prepare or View has published a
	// directory whose transaction has not settled yet. bbolt hands out the
	// ID of a transaction that failed again, possibly before the failed
	// Prepare has removed its directory; the next owner of the ID must not
	// take that directory for a leftover, nor must the failed Prepare remove
	// the next owner's.
	pendingMu sync.Mutex
	pending   map[string]bool
}

// New returns an overlayfs snapshotter keeping its files under root
// (created if needed) and its metadata in ms. The snapshotter owns ms from
// then on: Close closes it. When New fails, ms is left open for the caller.
//
// The snapshotter returned also implements snapshots.Cleaner. It assumes
// that nothing else writes under <root>/snapshots, unless ms is
// host-scoped: then root may be shared by the snapshotters of every host
// of ms's root (see the package documentation).
//
//	ms, err := storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"))
//	// or: ms, err := storage.NewEtcdStore("/snapshotters/overlay", &clientv3.Config{...})
//	sn, err := overlaysnap.New(root, ms)
func New(root string, ms storage.MetaStore, opts ...Opt) (snapshots.Snapshotter, error) {
	if ms == nil {
		return nil, fmt.Errorf("nil metadata store: %w", errdefs.ErrInvalidArgument)
	}
	if root == "" {
		return nil, fmt.Errorf("empty root directory: %w", errdefs.ErrInvalidArgument)
	}
	var cfg config
	for _, opt := range opts {
		if err := opt(&cfg); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	if err := os.Mkdir(filepath.Join(root, "snapshots"), 0o700); err != nil && !os.IsExist(err) {
		return nil, err
	}
	_, scoped := storage.HostOf(ms)
	if scoped {
		cfg.upperdirLabel = true
	}
	return &snapshotter{root: root, ms: ms, cfg: cfg, scoped: scoped, pending: map[string]bool{}}, nil
}

// Stat returns the info of the snapshot named key.
func (o *snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Info{}, err
	}
	return info, nil
}

// Update changes the labels of a snapshot. With WithUpperdirLabel, an active
// snapshot keeps UpperdirLabel whatever the update says.
func (o *snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (_ snapshots.Info, err error) {
	var updated snapshots.Info
	err = o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		updated, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		if err != nil || !o.cfg.upperdirLabel || updated.Kind != snapshots.KindActive {
			return err
		}
		id, _, _, err := storage.GetInfo(ctx, info.Name)
		if err != nil {
			return err
		}
		if updated.Labels[UpperdirLabel] == o.upperPath(id) {
			return nil
		}
		updated, err = o.labelUpperdir(ctx, info.Name, id)
		return err
	})
	if err != nil {
		return snapshots.Info{}, err
	}
	return updated, nil
}

// labelUpperdir sets UpperdirLabel on the active snapshot key, whose ID is
// id, in the transaction ctx carries.
func (o *snapshotter) labelUpperdir(ctx context.Context, key, id string) (snapshots.Info, error) {
	info := snapshots.Info{Name: key, Labels: map[string]string{UpperdirLabel: o.upperPath(id)}}
	return storage.UpdateInfo(ctx, info, "labels."+UpperdirLabel)
}

// Usage returns the disk usage of a snapshot: measured on its upper
// directory for an active snapshot, as recorded at commit for a committed
// one, zero for a view.
func (o *snapshotter) Usage(ctx context.Context, key string) (usage snapshots.Usage, err error) {
	var (
		id   string
		info snapshots.Info
	)
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, o.upperPath(id))
		if err != nil {
			return snapshots.Usage{}, err
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Mounts returns the mounts of an active or view snapshot (see the package
// documentation); a committed snapshot has none (FailedPrecondition).
func (o *snapshotter) Mounts(ctx context.Context, key string) (_ []mount.Mount, err error) {
	var s storage.Snapshot
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		s, err = storage.GetSnapshot(ctx, key)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("failed to get snapshot mount: %w", err)
	}
	return o.mounts(s), nil
}

// Prepare creates an active snapshot key on parent (none if empty) and
// returns its mounts: writes through them land in its upper directory.
func (o *snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return o.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only view key of parent (none if empty) and returns
// its mounts.
func (o *snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return o.create(ctx, snapshots.KindView, key, parent, opts)
}

// errIDPending: the ID just allocated still names the directory of a failed
// Prepare that has not removed it yet. It is retried.
var errIDPending = errors.New("the directory of this ID still belongs to a failed Prepare")

// create adds an active or view snapshot. See the package documentation for
// why the directory is built before the transaction and published inside it.
func (o *snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, retErr error) {
	if err := storage.PrepareRemote(ctx, o.ms, key, parent, opts...); err != nil {
		return nil, err
	}
	o.fsMu.RLock()
	defer o.fsMu.RUnlock()

	tmp, err := o.newDir(kind)
	if err != nil {
		return nil, err
	}
	var (
		cur        = tmp // where the new directory is now
		curID      string
		discard    []string // leftovers moved aside, to remove after the transaction
		s          storage.Snapshot
		callbackOK bool // the callback succeeded: an error is Commit's
	)
	defer func() {
		if retErr != nil {
			if err := os.RemoveAll(cur); err != nil {
				log.G(ctx).WithError(err).WithField("path", cur).Warn("failed to remove directory of failed snapshot")
			}
		}
		if curID != "" {
			o.release(curID)
		}
		for _, d := range discard {
			if err := os.RemoveAll(d); err != nil {
				log.G(ctx).WithError(err).WithField("path", d).Warn("failed to remove leftover directory; Cleanup removes it")
			}
		}
	}()

	fn := func(ctx context.Context) error {
		callbackOK = false
		// Undo the previous attempt's publication: this attempt may get
		// another ID.
		if cur != tmp {
			if err := os.Rename(cur, tmp); err != nil {
				return fmt.Errorf("failed to unpublish %s: %w", cur, err)
			}
			cur = tmp
			o.release(curID)
			curID = ""
		}
		var err error
		s, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return fmt.Errorf("failed to create snapshot: %w", err)
		}
		if kind == snapshots.KindActive && o.cfg.upperdirLabel {
			if _, err := o.labelUpperdir(ctx, key, s.ID); err != nil {
				return fmt.Errorf("failed to record the upper directory: %w", err)
			}
		}
		if kind == snapshots.KindActive && len(s.ParentIDs) > 0 {
			// overlayfs shows the upper directory's own owner and mode at the
			// root of the merged tree: take the parent's, which is what the
			// root looked like until now. Again on every attempt, since the
			// parent's name may stand for another snapshot by then.
			if err := copyRootAttrs(filepath.Join(tmp, "fs"), o.upperPath(s.ParentIDs[0])); err != nil {
				return err
			}
		}
		if !o.claim(s.ID) {
			return errIDPending
		}
		path := o.dir(s.ID)
		aside, err := o.moveAside(path)
		if err != nil {
			o.release(s.ID)
			return err
		}
		if aside != "" {
			// The ID was allocated to this transaction, so no snapshot owns
			// the directory: it was published by a transaction that never
			// committed (bbolt reuses such IDs).
			log.G(ctx).WithField("path", path).Warn("replacing leftover directory of an uncommitted snapshot")
			discard = append(discard, aside)
		}
		if err := os.Rename(tmp, path); err != nil {
			o.release(s.ID)
			return fmt.Errorf("failed to publish %s: %w", path, err)
		}
		cur, curID = path, s.ID
		callbackOK = true
		return nil
	}

	backoff := time.Millisecond
	for {
		err = o.ms.WithTransaction(ctx, true, fn)
		if !errors.Is(err, errIDPending) {
			break
		}
		// The failed Prepare that holds the ID removes its directory right
		// after its transaction ends; bbolt then hands the ID out again.
		select {
		case <-ctx.Done():
			return nil, errors.Join(err, ctx.Err())
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 100*time.Millisecond)
	}
	if err != nil && callbackOK && o.landed(ctx, key, s.ID) {
		// Commit reported an error, yet the snapshot is there with our ID:
		// the outcome was only unknown to us (a timeout after etcd applied
		// the transaction). The directory belongs to it.
		log.G(ctx).WithError(err).WithField("key", key).Warn("commit reported an error but the snapshot was created")
		err = nil
	}
	if err != nil {
		return nil, err
	}
	return o.mounts(s), nil
}

// claim marks id as published by a create whose transaction has not
// settled; it reports false when another create holds it.
func (o *snapshotter) claim(id string) bool {
	o.pendingMu.Lock()
	defer o.pendingMu.Unlock()
	if o.pending[id] {
		return false
	}
	o.pending[id] = true
	return true
}

func (o *snapshotter) release(id string) {
	o.pendingMu.Lock()
	defer o.pendingMu.Unlock()
	delete(o.pending, id)
}

// moveAside moves path, if it exists, into a new rm-* directory and returns
// that directory ("" if path did not exist). Renaming is quick, and works
// where removing would not (a mount left below path by a killed process).
func (o *snapshotter) moveAside(path string) (string, error) {
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return "", nil
	} else if err != nil {
		return "", err
	}
	aside, err := os.MkdirTemp(filepath.Join(o.root, "snapshots"), "rm-")
	if err != nil {
		return "", err
	}
	if err := os.Rename(path, filepath.Join(aside, "leftover")); err != nil {
		return "", errors.Join(fmt.Errorf("failed to move leftover %s aside: %w", path, err), os.Remove(aside))
	}
	return aside, nil
}

// landed reports whether the snapshot key exists with the given ID. It is
// asked after a failed Commit, whose context may be done.
func (o *snapshotter) landed(ctx context.Context, key, id string) bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	var got string
	err := o.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		got, _, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return err == nil && got == id
}

// Commit turns the active snapshot key into the committed snapshot name,
// recording the disk usage of its upper directory. The committed snapshot's
// labels are those opts give (UpperdirLabel is not carried over). On a
// host-scoped store, a commit labelled containerd.io/snapshot.ref is a
// layer other hosts may bind (storage.CommitShared).
func (o *snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	var (
		usage   snapshots.Usage
		usageOf string // ID usage was measured for
	)
	return o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		// Measure once; a retry measures again only for another snapshot.
		// CommitActive refuses anything but an active snapshot, so nothing
		// else needs measuring.
		if info.Kind == snapshots.KindActive && usageOf != id {
			du, err := fs.DiskUsage(ctx, o.upperPath(id))
			if err != nil {
				return err
			}
			usage, usageOf = snapshots.Usage(du), id
		}
		if _, err := storage.CommitRemote(ctx, key, name, usage, opts...); err != nil {
			return fmt.Errorf("failed to commit snapshot: %w", err)
		}
		return nil
	})
}

// Remove removes the snapshot key, which must have no children, and its
// files unless another host's binding of the same layer still uses them
// (storage.Release). The metadata goes first: files are deleted only once
// no snapshot refers to them, so a failure leaves garbage (which Cleanup
// removes), never a snapshot without its directory.
func (o *snapshotter) Remove(ctx context.Context, key string) (err error) {
	o.fsMu.RLock()
	defer o.fsMu.RUnlock()
	var (
		id   string
		last bool
	)
	err = o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, _, last, err = storage.Release(ctx, key)
		if err != nil {
			return fmt.Errorf("failed to remove: %w", err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !last {
		log.G(ctx).WithFields(log.Fields{"key": key, "id": id}).Debug("released a shared layer that other bindings still use")
		return nil
	}
	path, renamed := o.dir(id), filepath.Join(o.root, "snapshots", "rm-"+id)
	if err := os.Rename(path, renamed); err != nil {
		log.G(ctx).WithError(err).WithField("path", path).Warn("failed to rename removed snapshot")
		return nil
	}
	if err := os.RemoveAll(renamed); err != nil {
		log.G(ctx).WithError(err).WithField("path", renamed).Warn("failed to remove directory of removed snapshot; Cleanup removes it")
	}
	return nil
}

// Walk calls fn for every snapshot matching filters.
func (o *snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Cleanup removes every entry of <root>/snapshots that no snapshot's ID
// names: directories left by removals that failed half-way, by Prepares
// that were killed, and by snapshots removed from the store by other means.
// It waits for this snapshotter's Prepares, Views and Removes in progress,
// and holds off new ones while it runs. It returns the errors of the
// entries it could not remove, having tried all of them.
//
// On a host-scoped store it removes nothing and returns nil: the root
// directory is shared with other hosts, whose snapshots this host's scope
// does not show, and whose Prepares publish directories under IDs that no
// scope holds until their transactions commit; nothing tells such a
// directory from garbage without a look at every scope at once, with
// every host quiet; that is an operator's job.
func (o *snapshotter) Cleanup(ctx context.Context) error {
	if o.scoped {
		log.G(ctx).Debug("cleanup skipped: the store is host-scoped, so the root directory holds other hosts' snapshots too")
		return nil
	}
	o.fsMu.Lock()
	defer o.fsMu.Unlock()
	var ids map[string]string
	err := o.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		ids, err = storage.IDMap(ctx)
		return err
	})
	if err != nil {
		return err
	}
	dir := filepath.Join(o.root, "snapshots")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if _, live := ids[e.Name()]; live {
			continue
		}
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		path := filepath.Join(dir, e.Name())
		log.G(ctx).WithField("path", path).Debug("removing directory no snapshot names")
		if err := os.RemoveAll(path); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Close closes the metadata store. Closing twice is safe.
func (o *snapshotter) Close() error {
	return o.ms.Close()
}

func (o *snapshotter) dir(id string) string {
	return filepath.Join(o.root, "snapshots", id)
}

// upperPath is the fs directory of snapshot id: an active's upper
// directory, a committed snapshot's layer.
func (o *snapshotter) upperPath(id string) string {
	return filepath.Join(o.root, "snapshots", id, "fs")
}

func (o *snapshotter) workPath(id string) string {
	return filepath.Join(o.root, "snapshots", id, "work")
}

// newDir makes the directory of a new snapshot under a temporary name: fs,
// with the permissions a container's root expects, and for an active
// snapshot work, which overlayfs wants empty and on the same filesystem as
// fs.
func (o *snapshotter) newDir(kind snapshots.Kind) (_ string, retErr error) {
	td, err := os.MkdirTemp(filepath.Join(o.root, "snapshots"), "new-")
	if err != nil {
		return "", fmt.Errorf("failed to create temp dir: %w", err)
	}
	defer func() {
		if retErr != nil {
			retErr = errors.Join(retErr, os.RemoveAll(td))
		}
	}()
	upper := filepath.Join(td, "fs")
	if err := os.Mkdir(upper, 0o755); err != nil {
		return "", err
	}
	// Mkdir's mode is filtered by the umask.
	if err := os.Chmod(upper, 0o755); err != nil {
		return "", fmt.Errorf("failed to chmod %s to 0755: %w", upper, err)
	}
	if kind == snapshots.KindActive {
		if err := os.Mkdir(filepath.Join(td, "work"), 0o700); err != nil {
			return "", err
		}
	}
	return td, nil
}

// copyRootAttrs gives dst the owner and permission bits of src.
func copyRootAttrs(dst, src string) error {
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("failed to stat parent's directory: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("no owner for %s", src)
	}
	if err := os.Lchown(dst, int(st.Uid), int(st.Gid)); err != nil {
		return fmt.Errorf("failed to chown %s: %w", dst, err)
	}
	mode := fi.Mode() & (os.ModePerm | os.ModeSetuid | os.ModeSetgid | os.ModeSticky)
	if err := os.Chmod(dst, mode); err != nil {
		return fmt.Errorf("failed to chmod %s: %w", dst, err)
	}
	return nil
}

// mounts returns the mounts of s (see the package documentation).
func (o *snapshotter) mounts(s storage.Snapshot) []mount.Mount {
	bind := func(source, mode string) []mount.Mount {
		return []mount.Mount{{Type: "bind", Source: source, Options: []string{"rbind", mode}}}
	}
	lowers := make([]string, len(s.ParentIDs))
	for i, id := range s.ParentIDs {
		lowers[i] = o.upperPath(id)
	}
	lowerdir := "lowerdir=" + strings.Join(lowers, ":")
	options := append([]string(nil), o.cfg.mountOptions...)

	switch {
	case s.Kind == snapshots.KindActive && len(s.ParentIDs) == 0:
		return bind(o.upperPath(s.ID), "rw")
	case s.Kind == snapshots.KindActive:
		options = append(options,
			"workdir="+o.workPath(s.ID),
			"upperdir="+o.upperPath(s.ID),
			lowerdir,
		)
	case len(s.ParentIDs) == 0:
		return bind(o.upperPath(s.ID), "ro")
	case len(s.ParentIDs) == 1:
		return bind(lowers[0], "ro")
	default:
		// Without an upper directory overlayfs is read-only anyway; "ro"
		// says so to whoever reads the options.
		options = append(options, "ro", lowerdir)
	}
	return []mount.Mount{{Type: "overlay", Source: "overlay", Options: options}}
}
