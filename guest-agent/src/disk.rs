//! Customizing a disk image in place: mount it per its fstab, apply the customizations, and
//! unmount cleanly. The writes land in the host's qcow2 overlay; the host converts that to the
//! output format, so the input image is never touched.

use std::path::PathBuf;

use vmic_protocol::{DiskBuild, DiskOutcome, Step};

use crate::build::{disk_by_serial, Build, Mounts};
use crate::context::RequestContext;
use crate::customize::{customize_image, remove_config_mountpoint};
use crate::image::{check_arch, mount_image, IMAGE_ROOT};
use crate::iso::vm_arch;

pub fn customize(request: DiskBuild, context: &RequestContext) -> anyhow::Result<DiskOutcome> {
    let mut build = Build::new(context);
    let input = disk_by_serial(&request.input_serial)?.device;
    let mut mounts = Mounts::default();

    build.step(Step::Mount)?;
    let root = mount_image(&build, &mut mounts, &input)?;
    check_arch(&root, vm_arch())?;

    build.step(Step::Customize)?;
    let epoch = crate::inventory::epoch_from_image(&build, &root);
    let chroot_mounts = customize_image(&build, &root, &request.customization, epoch)?;
    drop(chroot_mounts);
    remove_config_mountpoint(&root);
    let packages = crate::inventory::read_packages(&build, &root)?;

    build.step(Step::Unmount)?;
    mounts.unmount_below(&PathBuf::from(IMAGE_ROOT));
    // SAFETY: sync(2) takes no arguments; every write must reach the overlay before the host
    // converts it.
    unsafe { libc::sync() };
    build.end_step();
    Ok(DiskOutcome {
        steps: build.steps,
        packages,
    })
}
