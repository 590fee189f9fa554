"""The guest half of a prepare: a bash script that reads the payload on stdin.

It needs bash, git, coreutils, findutils and GNU tar in the guest. In order it: creates the
checkout (fresh) or enters it; stores the pack and its index; extends `.git/shallow`; points
HEAD at the commit (on the host's branch, on `--branch NAME`, or detached when the host's HEAD
is detached); rebuilds the index from the commit (keeping stat data of unchanged files, or a
hard reset in fresh/reset mode); deletes, restores and chmods what the plan says; extracts the
tar; marks new files of the host's index intent-to-add (so they show as new, not untracked;
the host's staged/unstaged split is otherwise not reproduced); sets origin and the
repository's identity; and records the import:

- `refs/stoker/base`: the commit checked out (what `export` diffs against by default),
- `refs/stoker/host-head`: the host's HEAD, `refs/stoker/previous-head`: a guest HEAD that
  the import moved away from (so guest-only commits stay reachable),
- `refs/stoker/shipped`: a commit (parent: base) of the work tree exactly as shipped; an export
  against it yields only what changed in the guest, which applies on the host's work tree.

`stoker.importing` is set while the import runs, so a probe after a cut-short import reports
"incomplete" and the next prepare resets the checkout instead of trusting it.
"""

from __future__ import annotations

import shlex

from stoker.daemon.workspace.framing import BASH_PRELUDE
from stoker.daemon.workspace.plan import Plan
from stoker.daemon.workspace.state import check_guest_path
from stoker.errors import CommandFailed, Conflict

SHIPPED_REF = "refs/stoker/shipped"
BASE_REF = "refs/stoker/base"

# Exit codes the script uses (besides git's own failures, reported as 1).
EXIT_PAYLOAD = 4
EXIT_PATH = 5

_IMPORT_BODY = r"""
exec 3<&0 0</dev/null
readhdr STOKER-PAYLOAD
[ "$H_LEN" = 1 ] || die 4 "payload version $H_LEN is not understood by this script"
case $MODE in
fresh)
    if [ -e "$P" ] || [ -L "$P" ]; then
        [ -d "$P" ] && [ -z "$(ls -A -- "$P")" ] ||
            die 5 "$P appeared in the VM while preparing: run prepare again"
    fi
    mkdir -p -- "$P" || die 5 "cannot create $P"
    cd -- "$P" || die 5 "cannot enter $P"
    git init -q . || die 1 "git init failed in $P"
    ;;
*)
    cd -- "$P" 2>/dev/null || die 5 "$P disappeared from the VM while preparing: run prepare again"
    [ "$(git config --bool --get stoker.workspace 2>/dev/null)" = true ] ||
        die 5 "$P is no longer a stoker workspace: run prepare again"
    ;;
esac
gitdir=$(git rev-parse --absolute-git-dir) || die 1 "cannot find the git directory of $P"
git config stoker.importing true || die 1 "cannot write $gitdir/config"
T=$(mktemp -d "$gitdir/stoker-import.XXXXXX") || die 1 "mktemp failed"
trap 'rm -rf -- "$T" "$gitdir/objects/pack/tmp_stoker_$$".*' EXIT
say() { printf 'stage %s\n' "$1"; }

say objects
readhdr pack
PACKNAME=$H_ARG PACKLEN=$H_LEN
if [ "$PACKLEN" -gt 0 ]; then
    case $PACKNAME in *[!0-9a-f]*|'') die 4 "bad pack name in payload" ;; esac
    take "$gitdir/objects/pack/tmp_stoker_$$.pack"
fi
readhdr idx
if [ "$PACKLEN" -gt 0 ]; then
    take "$gitdir/objects/pack/tmp_stoker_$$.idx"
    chmod 0444 "$gitdir/objects/pack/tmp_stoker_$$".*
    # git finds a pack through its .idx: move the .pack into place first.
    mv -f -- "$gitdir/objects/pack/tmp_stoker_$$.pack" "$gitdir/objects/pack/pack-$PACKNAME.pack"
    mv -f -- "$gitdir/objects/pack/tmp_stoker_$$.idx" "$gitdir/objects/pack/pack-$PACKNAME.idx"
fi
readhdr shallow; take "$T/shallow"
if [ -s "$T/shallow" ]; then
    cat -- "$T/shallow" > "$T/shallow.new"
    [ -f "$gitdir/shallow" ] && cat -- "$gitdir/shallow" >> "$T/shallow.new"
    sort -u -- "$T/shallow.new" > "$T/shallow.sorted" &&
        mv -f -- "$T/shallow.sorted" "$gitdir/shallow" || die 1 "cannot write $gitdir/shallow"
fi
for f in delete rmdir restore exec noexec ita; do readhdr "$f"; take "$T/$f"; done

say checkout
old=$(git rev-parse -q --verify 'HEAD^{commit}' 2>/dev/null) || old=
if [ -n "$old" ] && [ "$old" != "$TARGET" ]; then
    git update-ref refs/stoker/previous-head "$old" || die 1 "cannot record the previous HEAD"
fi
if [ -n "$BRANCH" ]; then
    if [ -n "$TARGET" ]; then
        git update-ref "refs/heads/$BRANCH" "$TARGET" || die 1 "cannot set branch $BRANCH"
    else
        git update-ref -d "refs/heads/$BRANCH" 2>/dev/null
    fi
    git symbolic-ref HEAD "refs/heads/$BRANCH" || die 1 "cannot check out branch $BRANCH"
else
    git update-ref --no-deref HEAD "$TARGET" || die 1 "cannot detach HEAD at $TARGET"
fi
if [ -n "$EXTRA" ]; then
    git update-ref "refs/heads/$EXTRA" "$HOSTHEAD" || die 1 "cannot set branch $EXTRA"
fi
if [ -z "$TARGET" ]; then
    git read-tree --empty || die 1 "git read-tree failed"
elif [ "$MODE" = update ]; then
    git reset -q --mixed >/dev/null 2>"$T/err" || die 1 "git reset failed: $(tail -c 2000 "$T/err")"
else
    git reset -q --hard >/dev/null 2>"$T/err" ||
        die 1 "git reset --hard failed: $(tail -c 2000 "$T/err")"
fi
if [ "$MODE" = reset ]; then
    git clean -f -d -q || die 1 "git clean failed"
fi

say files
xargs -0 -r rm -f -- < "$T/delete" 2>/dev/null
xargs -0 -r rmdir --ignore-fail-on-non-empty -- < "$T/rmdir" 2>/dev/null
if [ -s "$T/restore" ]; then
    git checkout-index -f -z --stdin < "$T/restore" || die 1 "git checkout-index failed"
fi
xargs -0 -r chmod 0755 -- < "$T/exec" || die 1 "chmod failed"
xargs -0 -r chmod 0644 -- < "$T/noexec" || die 1 "chmod failed"
readhdr tar
if [ "$H_LEN" != 0 ]; then
    tar -x -f - -p --no-same-owner --no-overwrite-dir <&3 2>"$T/err" ||
        die 4 "extracting the work-tree files failed: $(tail -c 2000 "$T/err")"
fi

if [ -s "$T/ita" ]; then
    GIT_LITERAL_PATHSPECS=1 xargs -0 git add -N -- < "$T/ita" 2>"$T/err" ||
        die 1 "git add -N failed: $(tail -c 2000 "$T/err")"
fi

say config
if [ -n "$ORIGIN" ]; then
    git config remote.origin.url "$ORIGIN" || die 1 "cannot set origin"
    git config --get remote.origin.fetch >/dev/null ||
        git config remote.origin.fetch '+refs/heads/*:refs/remotes/origin/*'
else
    git remote remove origin >/dev/null 2>&1
fi
if [ -n "$NAME" ]; then git config user.name "$NAME"; else git config --unset-all user.name; fi
if [ -n "$EMAIL" ]; then git config user.email "$EMAIL"; else git config --unset-all user.email; fi
git update-index -q --refresh >/dev/null 2>&1

say record
if [ -n "$TARGET" ]; then
    cp -- "$gitdir/index" "$T/index" || die 1 "cannot copy the index"
    tree=$(GIT_INDEX_FILE="$T/index" git -c core.loosecompression=0 add -A 2>/dev/null &&
        GIT_INDEX_FILE="$T/index" git write-tree) || die 1 "cannot snapshot the work tree"
    shipped=$(git commit-tree "$tree" -p "$TARGET" -m "stoker: work tree as prepared" \
        </dev/null) || die 1 "cannot record the prepared work tree"
    git update-ref refs/stoker/shipped "$shipped" || die 1 "cannot record the prepared work tree"
    git update-ref refs/stoker/base "$TARGET" || die 1 "cannot record the base commit"
else
    git update-ref -d refs/stoker/shipped 2>/dev/null
    git update-ref -d refs/stoker/base 2>/dev/null
fi
if [ -n "$HOSTHEAD" ]; then
    git update-ref refs/stoker/host-head "$HOSTHEAD" || die 1 "cannot record the host HEAD"
else
    git update-ref -d refs/stoker/host-head 2>/dev/null
fi
git config stoker.workspace true && git config --unset stoker.importing ||
    die 1 "cannot mark $P as a stoker workspace"
printf 'ok %s\n' "${TARGET:--}"
"""


def guest_import_script(guest_path: str, plan: Plan) -> str:
    """The bash script that applies `plan`'s payload (on stdin) to the checkout at
    `guest_path`. Run it in the guest with the payload from `build_payload` as its stdin."""
    p = check_guest_path(guest_path)

    def q(v: str | None) -> str:
        return shlex.quote(v or "")

    head = (
        f"P={q(p)}\nMODE={q(plan.mode)}\nTARGET={q(plan.target)}\nHOSTHEAD={q(plan.host_head)}\n"
        f"BRANCH={q(plan.branch)}\nEXTRA={q(plan.extra_branch)}\nORIGIN={q(plan.origin)}\n"
        f"NAME={q(plan.user_name)}\nEMAIL={q(plan.user_email)}\n"
    )
    return BASH_PRELUDE + head + _IMPORT_BODY


def check_import_result(exit_status: int, stdout: bytes, stderr: bytes) -> str | None:
    """Raise a clear error unless the import script finished; return the commit checked out
    (None for a repository without commits)."""
    err = stderr.decode(errors="replace").strip()[-2000:]
    lines = stdout.decode(errors="replace").splitlines()
    last = lines[-1] if lines else ""
    if exit_status == 0 and last.startswith("ok "):
        sha = last[3:].strip()
        return None if sha == "-" else sha
    if exit_status == EXIT_PATH:
        raise Conflict(f"preparing the workspace failed: {err or 'the guest path changed'}")
    raise CommandFailed(
        f"preparing the workspace in the guest failed (exit {exit_status}): {err or 'no output'}"
    )
